"""Low-bit stand-ins (convert/standins.py, runtime `standin_share`): what is written, how the manifest and the
reader check it, how adding them fails without harm, and what the runtime computes with them, on the trained
fixture converted to q4_0 (its stand-ins q2_k, the shape of a Q4_0 Mixtral and its Q2_K copies)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mertools.cli import main
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.convert.standins import add_standins
from mertools.dtypes import DTYPES
from mertools.errors import ConversionError, LayoutError
from mertools.layout import Layout
from mertools.layout.manifest import Manifest, ManifestError
from mertools.layout.writer import write_manifest
from mertools.runtime.approx import Approx, standin_choices
from mertools.runtime.engine import Engine, RuntimeConfigError
from mertools.verify.numerics import compare_logits

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained"
SNIPPET = (TRAINED / "held-out-julius-caesar.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained fixture as q4_0 with q2_k stand-ins (read-only: copy before changing it)."""
    out = convert(TRAINED / "tiny-shakespeare-moe", tmp_path_factory.mktemp("standins") / "q4",
                  ConvertOptions(dtype="q4_0", progress=False)).out
    add_standins(out, "q2_k")
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "lay"))


# ---------------------------------------------------------------------- writing
def test_standins_are_the_experts_requantized(q4: Path) -> None:
    lay = Layout.open(q4)
    m = lay.manifest
    assert len(m.standins) == len(m.experts) and lay.verify_checksums() == []
    for s, e in zip(m.standins, m.experts, strict=True):
        assert (s.layer, s.expert) == (e.layer, e.expert) and s.file.startswith("standins/q2_k/")
        assert s.nbytes < e.nbytes and s.nbytes % 4096 == 0
        for role, t in s.tensors.items():
            full = lay.read_tensor(e.file, e.tensors[role])
            want = DTYPES["q2_k"].quantize(DTYPES["q4_0"].dequantize(full))  # ggml's reference, from the layout's bytes
            assert t.dtype == "q2_k" and t.shape == e.tensors[role].shape
            assert np.array_equal(lay.read_tensor(s.file, t), want)
    # the manifest round-trips, and a reader that predates stand-ins finds every full expert where it was
    assert Manifest.from_dict(json.loads(m.to_json())).standins == m.standins
    assert "standins" not in replace(m, standins=[]).to_dict()


@pytest.mark.parametrize("target", ["q2_k", "iq2_xxs"])
def test_an_encoder_makes_the_requantized_tensors(q4: Path, tmp_path: Path, target: str) -> None:
    """`encode` (benchmarks: a faster, rougher quantizer) replaces ggml's quantizer, nothing else: it gets each expert
    tensor's bytes, and what it returns is written, checksummed and read back like the quantizer's."""
    import importlib

    rough = getattr(importlib.import_module(f"benchmarks.rough_{target}"), f"rough_{target}")
    lay = Path(shutil.copytree(q4, tmp_path / "lay"))
    without = replace(Layout.open(lay).manifest, standins=[])
    shutil.rmtree(lay / "standins")
    write_manifest(lay, without)
    seen: list[bytes] = []

    def encode(raw: np.ndarray, dtype: str, shape: tuple[int, ...], target: str) -> np.ndarray:
        seen.append(raw.tobytes())
        return rough(raw, dtype, shape, target)

    s = add_standins(lay, target, encode=encode)
    opened = Layout.open(lay)
    m = opened.manifest
    assert opened.verify_checksums() == [] and s.files == len(m.experts) == len(m.standins) and len(seen) == s.requantized
    for e, st in zip(m.experts, m.standins, strict=True):
        for role, t in st.tensors.items():
            full = opened.read_tensor(e.file, e.tensors[role])
            assert full.tobytes() in seen and t.dtype == target
            got = opened.read_tensor(st.file, t)
            assert np.array_equal(got, rough(full, "q4_0", t.shape, target))
            x, y = DTYPES["q4_0"].dequantize(full), DTYPES[target].dequantize(got)  # a rough copy of the expert
            assert np.corrcoef(x, y)[0, 1] > 0.8, (e.layer, e.expert, role)
    with pytest.raises(ValueError, match=f"writes {target} stand-ins, not q4_0"):
        rough(full, "q4_0", t.shape, "q4_0")


def test_biases_and_small_tensors_are_copied(tmp_path: Path) -> None:
    from fixtures.tiny_families import build_hf

    lay = convert(build_hf("gpt_oss", tmp_path / "hf"), tmp_path / "lay", ConvertOptions(progress=False)).out
    with pytest.raises(ConversionError, match=r"layer 0 expert 0 gate: rows of 128 weights .* q2_k's block of 256"):
        add_standins(lay, "q2_k")
    assert not (lay / "standins").exists() or not any((lay / "standins").iterdir())
    s = add_standins(lay, "q4_0")
    layout = Layout.open(lay)
    m = layout.manifest
    for st, e in zip(m.standins, m.experts, strict=True):
        for role in ("gate_bias", "up_bias", "down_bias"):
            assert st.tensors[role].dtype == "f32"
            assert np.array_equal(layout.read_tensor(st.file, st.tensors[role]), layout.read_tensor(e.file, e.tensors[role]))
        assert st.tensors["gate"].dtype == "q4_0" != e.tensors["gate"].dtype
    assert s.requantized == 3 * len(m.experts) and layout.verify_checksums() == []


def test_adding_again_replacing_and_refusing(q4: Path, tmp_path: Path) -> None:
    lay = _copy(q4, tmp_path)
    with pytest.raises(ConversionError, match="already carries q2_k stand-ins"):
        add_standins(lay, "q2_k")
    add_standins(lay, "q3_k")  # replaces the q2_k set: its files are gone, the manifest names the new ones
    m = Layout.open(lay).manifest
    assert {t.dtype for s in m.standins for t in s.tensors.values()} == {"q3_k"}
    assert sorted(p.name for p in (lay / "standins").iterdir()) == ["q3_k"]
    with pytest.raises(ValueError, match="stand-in dtype must be one of"):
        add_standins(lay, "f16")


def test_a_failed_write_leaves_the_layout_as_it_was(tiny_q4_0: Path, tmp_path: Path) -> None:
    lay = _copy(tiny_q4_0, tmp_path)
    before = (lay / "manifest.json").read_bytes()
    (lay / "standins").write_text("a file where the directory goes")  # every write under it fails
    with pytest.raises(ConversionError, match="cannot write stand-ins.*is unchanged"):
        add_standins(lay, "q2_k")
    assert (lay / "manifest.json").read_bytes() == before
    assert Layout.open(lay).manifest.standins == []


def test_the_reader_checks_standins(q4: Path, tmp_path: Path) -> None:
    lay = _copy(q4, tmp_path)
    m = Layout.open(lay).manifest
    victim = lay / m.standins[5].file
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = Layout.open(lay).verify_checksums()
    assert [p.what for p in problems][:1] == ["stand-in (layer 0, expert 5) file"]
    victim.write_bytes(bytes(data[:4096]))
    with pytest.raises(LayoutError, match=r"expert_005\.bin: 4096 bytes"):
        Layout.open(lay)
    # a stand-in larger than its expert, or a grid with a hole, is refused by the schema
    d = json.loads((q4 / "manifest.json").read_text())
    d["standins"][0]["tensors"]["gate"] = d["experts"][0]["tensors"]["gate"] | {"dtype": "q8_0", "nbytes": 69632}
    with pytest.raises(ManifestError):
        Manifest.from_dict(d)
    d = json.loads((q4 / "manifest.json").read_text())
    del d["standins"][3]
    with pytest.raises(ManifestError, match="manifest.standins: 31 entries"):
        Manifest.from_dict(d)


# ---------------------------------------------------------------------- the runtime
def test_standin_choices() -> None:
    chosen = np.array([[0, 1], [2, 1], [3, 0]])
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    held = np.zeros(5, bool)
    held[3] = True
    # expert 1's largest share is 0.4, expert 0's 0.7 (its top-1 use), 2's 0.6; 3 is held
    assert standin_choices(chosen, weights, None, held, 0.5) == ([1], 2)
    assert standin_choices(chosen, weights, None, held, 0.65) == ([1, 2], 3)
    assert standin_choices(chosen, weights, None, held, 1.0) == ([0, 1, 2], 5)
    live = np.array([[True, True], [True, False], [True, True]])  # expert 1 used by row 0 alone: share 0.3
    assert standin_choices(chosen, weights, live, held, 0.35) == ([1], 1)


def _ids(layout: Path, n: int) -> list[int]:
    with Engine.open(layout) as eng:
        return eng.tokenizer.encode(SNIPPET)[:n]


def _decode(layout: Path, ids: list[int], cache_mb: float, **kw) -> tuple[np.ndarray, dict]:
    with Engine.open(layout, cache_mb=cache_mb, **kw) as eng:
        return np.concatenate([eng.forward(ids[:3])] + [eng.forward([i]) for i in ids[3:]]), eng.stats()


def test_every_miss_a_standin_is_the_standin_model(q4: Path, tmp_path: Path) -> None:
    """standin_share=1 without prefetching reads no full expert: bit for bit the exact engine on a layout whose
    experts are the stand-ins."""
    ids = _ids(q4, 24)
    low = _copy(q4, tmp_path)
    m = Layout.open(low).manifest
    write_manifest(low, replace(m, experts=m.standins, standins=[]))
    want, _ = _decode(low, ids, 1.0, prefetch="none", kv_dtype="f32")
    got, s = _decode(q4, ids, 1.0, prefetch="none", kv_dtype="f32", approx=Approx(standin_share=1.0))
    assert np.array_equal(got, want)
    assert s["approx_standins_per_token"] == 8 and s["bytes_read"] == s["standin_bytes_read"] > 0
    # lookups and hits count both caches: every stand-in was looked up in its own
    assert s["expert_lookups"] == s["expert_hits"] + s["expert_misses"] >= 8 * (len(ids) - 2)
    assert s["approx"] == "standin_share=1 standin_cache=0.5"


def test_standins_stay_close_and_read_fewer_bytes(q4: Path) -> None:
    ids = _ids(q4, 64)
    mb = 8 * max(e.nbytes for e in Layout.open(q4).manifest.experts) / 2**20 + 0.01  # 8 of 32 experts
    exact, s0 = _decode(q4, ids, mb)
    same, _ = _decode(q4, ids, mb, approx=Approx(standin_share=0.0))  # off: exact whatever the layout carries
    assert np.array_equal(exact, same)
    low, s1 = _decode(q4, ids, mb, approx=Approx(standin_share=1.0))
    fig = compare_logits(ids, low, exact)
    assert fig["kl_mean"] < 0.05 and fig["top1_agreement"] > 0.8  # q2_k copies of the experts: close, not exact
    assert s1["bytes_read"] < s0["bytes_read"] and s1["approx_standins"] > 0
    assert s1["cache_mb"] <= mb  # the stand-ins' slots come out of the same budget
    # below a share of 0.5 only second choices can be stand-ins (top-2: the first has at least half)
    _, s2 = _decode(q4, ids, mb, approx=Approx(standin_share=0.5))
    assert 0 < s2["approx_standins_per_token"] <= 4


def test_standins_must_be_there(tiny_q4_0: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="carries no stand-ins.*--standins q2_k"):
        Engine.open(tiny_q4_0, approx=Approx(standin_share=0.5))
    for bad in (dict(standin_share=1.5), dict(standin_fill=True), dict(standin_share=0.5, standin_cache=1.0)):
        with pytest.raises(ValueError):
            Approx(**bad)


def test_cli(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["convert", str(TRAINED / "tiny-shakespeare-moe"), str(tmp_path / "lay"), "--dtype",
                                  "q4_0", "--standins", "q2_k", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "wrote 32 q2_k stand-ins" in r.output
    r = CliRunner().invoke(main, ["standins", str(tmp_path / "lay"), "q2_k", "--quiet"])
    assert r.exit_code == 2 and "already carries q2_k stand-ins" in r.output
    r = CliRunner().invoke(main, ["run", str(tmp_path / "lay"), "-p", "ROMEO:", "-n", "4", "--cache-mb", "1",
                                  "--standin-share", "1", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["approx_standins"] > 0 and "computed with stand-ins" in r.output
