"""What the family tests (GLM-4.5, gpt-oss, DeepSeek) share: prompts, cache sizes, a spoiled reference,
llama.cpp's own converter with its vocabulary step swapped, and one chat completion through the real app."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mertools.layout import Layout
from mertools.reference import ReferenceModel

LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"))

_DRIVE = """
import importlib, runpy, sys
from pathlib import Path
src, module, cls = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = [str(src), str(src / "gguf-py")]
from conversion.base import TextModel
# the tiny models have the fixture's SentencePiece tokenizer, not the BPE one the family's converter expects
setattr(getattr(importlib.import_module(f"conversion.{module}"), cls), "set_vocab", TextModel._set_vocab_sentencepiece)
sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[4:]]
runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")
"""


def prompts(n: int = 2, length: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[1] + rng.integers(3, 512, length - 1).tolist() for _ in range(n)]


def cache_mb(layout: Path, slots: int) -> float:
    """A cache budget of `slots` of the layout's largest expert files (a hair more, so rounding keeps them all)."""
    return slots * max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20 * 1.001


def spoil(ref: ReferenceModel, cfg: dict | None = None, layer: Any = None) -> ReferenceModel:
    """The reference with config fields replaced and every layer's weights passed through `layer`."""
    ref.config = replace(ref.config, **(cfg or {}))
    if layer is not None:
        ref.layers = [layer(lw) for lw in ref.layers]
    return ref


def assert_close(got: np.ndarray, want: np.ndarray, rel: float, what: object = "") -> None:
    """max |got - want| within `rel` of the largest |want|, and the same top-1 at every position."""
    assert np.abs(got - want).max() <= rel * np.abs(want).max(), (what, np.abs(got - want).max(), np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def assert_engine_matches(eng: Any, ids: list[int], want: np.ndarray, rel: float, what: object = "") -> None:
    """The engine's logits of `ids` as one prefill, then as 4 ids and one token at a time, both `assert_close`."""
    eng.reset()
    assert_close(eng.forward(ids), want, rel, what)
    eng.reset()
    assert_close(np.concatenate([eng.forward(ids[:4])] + [eng.forward([t]) for t in ids[4:]]), want, rel, what)


def assert_f16_kv_within_f16_limits(layout: Path, ids: list[int], slots: int | None = None, kv: str = "f16"
                                    ) -> dict[str, Any]:
    """The default f16 KV cache (or `kv`) against the exact f32 one, prefill of half the ids then one token at a
    time: within verify's limits for weights of that type (mean KL, top-1, perplexity ratio). Returns the
    comparison."""
    from mertools.dtypes import DTYPES
    from mertools.runtime.engine import Engine
    from mertools.verify.numerics import compare_logits

    mb = cache_mb(layout, slots or Layout.open(layout).manifest.config.n_experts_used)
    half = len(ids) // 2
    runs = {}
    for dtype in (kv, "f32"):
        with Engine.open(layout, cache_mb=mb, kv_dtype=dtype) as eng:
            runs[dtype] = np.concatenate([eng.forward(ids[:half])] + [eng.forward([t]) for t in ids[half:]])
            assert eng.model.kv.dtype == dtype
    c = compare_logits(ids, runs[kv], runs["f32"])
    limits = DTYPES[kv].verify
    assert c["kl_mean"] <= limits.kl_mean and c["top1_agreement"] >= limits.top1 and c["ppl_ratio"] <= limits.ppl_ratio, c
    assert c["max_abs_diff"] > 0  # the storage does round
    return c


def llama_convert(module: str, cls: str, hf_dir: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a tiny directory, only `conversion.<module>.<cls>.set_vocab` swapped
    for its SentencePiece handler."""
    subprocess.run([sys.executable, "-c", _DRIVE, str(LLAMA_CPP), module, cls, str(hf_dir), "--outtype", outtype,
                    "--outfile", str(out)], check=True, capture_output=True, cwd=out.parent)
    return out


def chat_once(layout: Path, name: str) -> dict[str, Any]:
    """One greedy 6-token chat completion through the real app (the engine loads in the scheduler's thread)."""
    from fastapi.testclient import TestClient

    from mertools.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(str(layout), model_name=name))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["message"]["role"] == "assistant"
    return body


def serve_concurrently(layout: Path, prompts: list[str], max_tokens: int, **config: Any) -> tuple[list[str], str]:
    """Greedy completions of `prompts` sent at once to the real app (ServerConfig `config`, model "t"): their texts in
    order, and /metrics' text after them."""
    import threading

    from fastapi.testclient import TestClient

    from mertools.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(str(layout), model_name="t", **config))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        got: dict[int, str] = {}

        def one(i: int) -> None:
            r = client.post("/v1/completions", json={"model": "t", "prompt": prompts[i], "max_tokens": max_tokens,
                                                     "temperature": 0, "skip_special_tokens": False})
            got[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return [got.get(i, "") for i in range(len(prompts))], client.get("/metrics").text
