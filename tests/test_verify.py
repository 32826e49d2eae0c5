"""`mertools verify`: every corruption is found and named; numerics against numpy and transformers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mertools.cli import main
from mertools.layout import Layout


@pytest.fixture(scope="module")
def base(tiny_layout: Callable[..., Path]) -> Path:
    return tiny_layout("hf", "q4_k")


@pytest.fixture()
def lay(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "lay"))


def verify(*args: str) -> tuple[int, str, dict]:
    res = CliRunner().invoke(main, ["verify", *args, "--quiet"])
    out = {}
    if "--json" in args:
        path = Path(args[args.index("--json") + 1])
        out = json.loads(path.read_text()) if path.exists() else {}
    return res.exit_code, res.output, out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_intact_layout_passes(lay: Path, tmp_path: Path) -> None:
    code, out, js = verify(str(lay), "--json", str(tmp_path / "r.json"))
    assert code == 0 and out.strip().splitlines()[-1].startswith("OK:")
    assert js["integrity"]["ok"] and js["integrity"]["files_checked"] == 14 and js["integrity"]["tensors_checked"] == 41


def test_flipped_byte_in_an_expert_tensor_is_named(lay: Path) -> None:
    e = Layout.open(lay).manifest.expert(1, 3)
    flip(lay / e.file, e.tensors["down"].offset + 777)
    code, out, _ = verify(str(lay))
    problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
    assert code == 1 and "FAILED" in out and len(problems) == 2
    assert any("expert_003.bin: expert (layer 1, expert 3) down: xxh3" in p for p in problems)
    assert any("expert (layer 1, expert 3) file: xxh3" in p for p in problems)


def test_flipped_byte_in_padding_is_caught_by_the_file_checksum(lay: Path) -> None:
    t = Layout.open(lay).manifest.dense["blk.0.attn_norm.weight"]  # 1 KiB of f32, padded to 4 KiB
    flip(lay / "dense.bin", t.offset + t.nbytes + 100)  # in the padding: only the whole-file hash covers it
    code, out, _ = verify(str(lay))
    problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
    assert code == 1 and len(problems) == 1 and "file dense.bin: xxh3" in problems[0]


def test_flipped_byte_in_a_dense_tensor_is_named(lay: Path) -> None:
    t = Layout.open(lay).manifest.dense["blk.1.attn_k.weight"]
    flip(lay / "dense.bin", t.offset + 3)
    code, out, _ = verify(str(lay))
    assert code == 1 and "dense tensor blk.1.attn_k.weight: xxh3" in out and "file dense.bin: xxh3" in out


def test_changed_tokenizer_file_is_named(lay: Path) -> None:
    flip(lay / "tokenizer/tokenizer.json", 10)
    code, out, _ = verify(str(lay))
    assert code == 1 and "file tokenizer/tokenizer.json: xxh3" in out


def test_flipped_byte_in_the_manifest(lay: Path) -> None:
    m = json.loads((lay / "manifest.json").read_text())
    x = m["experts"][5]["tensors"]["up"]["xxh3"]
    m["experts"][5]["tensors"]["up"]["xxh3"] = x[:-1] + ("0" if x[-1] != "0" else "1")
    (lay / "manifest.json").write_text(json.dumps(m))
    code, out, _ = verify(str(lay))
    assert code == 1 and "expert (layer 1, expert 1) up: xxh3" in out
    raw = bytearray((lay / "manifest.json").read_bytes())
    raw[0] = ord("[")  # no longer JSON at all: not a layout, unusable input
    (lay / "manifest.json").write_bytes(bytes(raw))
    code, out, _ = verify(str(lay))
    assert code == 2 and "manifest.json" in out and len(out.strip().splitlines()) == 1


def test_truncated_and_missing_files_are_all_reported(lay: Path) -> None:
    m = Layout.open(lay).manifest
    os.truncate(lay / m.expert(0, 2).file, 4096)
    os.remove(lay / m.expert(1, 0).file)
    os.truncate(lay / "dense.bin", 8192)
    code, out, _ = verify(str(lay))
    assert code == 1
    assert "layer_000/expert_002.bin: 4096 bytes" in out and "truncated" in out
    assert "layer_001/expert_000.bin: missing" in out
    assert "dense.bin: 8192 bytes" in out


@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside.bin", "experts/../../x.bin"])
def test_manifest_path_outside_the_layout(lay: Path, path: str) -> None:
    m = json.loads((lay / "manifest.json").read_text())
    m["experts"][3]["file"] = path
    (lay / "manifest.json").write_text(json.dumps(m))
    code, out, _ = verify(str(lay))
    assert code == 1 and "must be relative and stay inside the layout" in out and "expert 3" in out


def test_symlink_outside_is_reported(lay: Path, tmp_path: Path) -> None:
    rel = Layout.open(lay).manifest.expert(1, 1).file
    shutil.move(lay / rel, tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", lay / rel)
    code, out, _ = verify(str(lay))
    assert code == 1 and "outside the layout" in out and "expert_001.bin" in out


def test_not_a_layout_is_unusable_input(tmp_path: Path, tiny: dict) -> None:
    for path in (tmp_path / "nothing", tiny["hf"]):
        code, out, _ = verify(str(path))
        assert code == 2 and len(out.strip().splitlines()) == 1 and "manifest.json" in out


# ---------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def layouts(tiny_layout: Callable[..., Path]) -> dict:
    lays = {(src, dt): tiny_layout(src, dt) for src in ("hf", "f16") for dt in ("f16", "q8_0", "q4_0", "q4_k")}
    lays[("q4_0", "q4_0")] = tiny_layout("q4_0")
    return lays


@pytest.mark.parametrize("src", ["hf", "f16"])
@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0", "q4_k"])
def test_numerics_report_for_every_dtype_and_source(layouts: dict, tiny: dict, tmp_path: Path, src: str, dtype: str) -> None:
    code, out, js = verify(str(layouts[(src, dtype)]), "--reference", str(tiny[src]), "--max-tokens", "64",
                           "--json", str(tmp_path / "r.json"))
    num = js["numerics"]
    assert num["tokens"] == 64 and num["dtype"] == dtype and len(num["per_position"]) == 64
    assert "KL" in out and "perplexity" in out and "top-1" in out
    assert code == (0 if num["ok"] else 1)
    # the figures order the dtypes as they should: f16 ~ exact, q8_0 close, 4-bit visibly lossy
    limit = {"f16": 1e-9, "q8_0": 2e-3, "q4_0": 0.08, "q4_k": 0.06}[dtype]
    assert 0 <= num["kl_mean"] < limit
    if dtype in ("f16", "q8_0"):
        assert code == 0
    if dtype == "f16":
        assert num["top1_agreement"] == 1.0 and num["max_abs_diff"] < 1e-4
    else:
        assert num["kl_mean"] > 1e-6  # quantization really happened


def test_quantized_gguf_to_same_dtype_is_exact(layouts: dict, tiny: dict, tmp_path: Path) -> None:
    code, _, js = verify(str(layouts[("q4_0", "q4_0")]), "--reference", str(tiny["q4_0"]), "--json", str(tmp_path / "r.json"))
    num = js["numerics"]
    assert code == 0 and num["kl_max"] < 1e-9 and num["top1_agreement"] == 1.0 and abs(num["ppl_ratio"] - 1) < 1e-6


def test_threshold_flags_decide_the_exit_code(layouts: dict, tiny: dict) -> None:
    lay, ref = str(layouts[("hf", "q4_0")]), str(tiny["hf"])
    code, out, _ = verify(lay, "--reference", ref, "--max-tokens", "32", "--max-kl", "1e-9")
    assert code == 1 and "mean KL" in out and "FAILED" in out
    code, _, _ = verify(lay, "--reference", ref, "--max-tokens", "32", "--max-kl", "1", "--min-top1", "0", "--max-ppl-ratio", "2")
    assert code == 0


def test_reference_of_another_model_is_refused(layouts: dict, tmp_path: Path) -> None:
    from fixtures.tiny_mixtral import TinyConfig, build_hf

    other = build_hf(tmp_path / "other", cfg=TinyConfig(num_hidden_layers=3, num_local_experts=8))
    code, out, _ = verify(str(layouts[("hf", "f16")]), "--reference", str(other))
    assert code == 2 and "is not the model of" in out and "n_layers 2 vs 3" in out and "n_experts 4 vs 8" in out


def test_numpy_and_transformers_references_agree(layouts: dict, tiny: dict, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mertools.verify.numerics import reference_logits

    ids = list(range(1, 40))
    for src in ("hf", "q4_0"):  # a HF directory and a quantized GGUF
        a, _ = reference_logits(tiny[src], ids, "numpy")
        b, _ = reference_logits(tiny[src], ids, "transformers")
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
        assert (a.argmax(1) == b.argmax(1)).all()
    reports = []
    for engine in ("numpy", "transformers"):
        _, _, js = verify(str(layouts[("f16", "q8_0")]), "--reference", str(tiny["f16"]), "--max-tokens", "48",
                          "--reference-engine", engine, "--json", str(tmp_path / f"{engine}.json"))
        reports.append(js["numerics"])
    assert reports[0]["kl_mean"] == pytest.approx(reports[1]["kl_mean"], rel=1e-3, abs=1e-8)
    assert reports[0]["top1_agreement"] == reports[1]["top1_agreement"]
