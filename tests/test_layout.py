"""The layout format on real files: alignment, checksums, atomic writes, and hostile manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from mertools.errors import ConversionError, LayoutError
from mertools.layout import ALIGNMENT, EncodedTensor, Layout, LayoutWriter, ModelConfig
from mertools.layout.constants import DTYPES

CFG = ModelConfig(
    arch="mixtral", vocab_size=64, d_model=64, d_ff=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
    n_experts=3, n_experts_used=2, context_length=128,
)


def _tensor(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> EncodedTensor:
    data = rng.integers(0, 256, size=DTYPES[dtype].nbytes(shape), dtype=np.uint8)
    return EncodedTensor(data, dtype, shape)


def write_layout(out: Path, *, seed: int = 0, force: bool = False, fail_at: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    with LayoutWriter(out, force=force) as w:
        w.write_dense("token_embd.weight", _tensor(rng, "f16", (64, 64)))
        w.write_dense("output_norm.weight", _tensor(rng, "f32", (64,)))
        n = 0
        for layer in range(CFG.n_layers):
            for e in range(CFG.n_experts):
                if n == fail_at:
                    raise RuntimeError("simulated failure")
                dt = ("q4_0", "q8_0", "f16")[e]
                w.write_expert(layer, e, {
                    "gate": _tensor(rng, dt, (96, 64)), "up": _tensor(rng, dt, (96, 64)), "down": _tensor(rng, dt, (64, 96)),
                })
                n += 1
        w.add_file("tokenizer/tokenizer.json", b'{"model": {}}')
        w.commit(CFG, {"kind": "hf", "files": ["tokenizer/tokenizer.json"]}, {"kind": "test"})
    return out


@pytest.fixture()
def layout_dir(tmp_path: Path) -> Path:
    return write_layout(tmp_path / "lay")


def test_alignment_sizes_and_checksums_match_bytes(layout_dir: Path) -> None:
    lay = Layout.open(layout_dir)
    m = lay.manifest
    assert len(m.experts) == CFG.n_layers * CFG.n_experts
    for e in m.experts:
        data = (layout_dir / e.file).read_bytes()
        assert len(data) == e.nbytes and e.nbytes % ALIGNMENT == 0
        assert xxhash.xxh3_64(data).hexdigest() == e.xxh3
        for t in e.tensors.values():
            assert t.offset % ALIGNMENT == 0
            assert xxhash.xxh3_64(data[t.offset:t.offset + t.nbytes]).hexdigest() == t.xxh3
    for t in m.dense.values():
        assert t.offset % ALIGNMENT == 0
    assert lay.verify_checksums() == []
    assert not (layout_dir.parent / "lay.partial").exists()


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    a, b = write_layout(tmp_path / "a"), write_layout(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_flipped_byte_is_reported_with_layer_expert_and_file(layout_dir: Path) -> None:
    lay = Layout.open(layout_dir)
    e = lay.manifest.expert(1, 2)
    path = layout_dir / e.file
    with open(path, "r+b") as f:
        f.seek(e.tensors["up"].offset + 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    problems = Layout.open(layout_dir).verify_checksums()
    whats = {p.what for p in problems}
    assert whats == {"expert (layer 1, expert 2) file", "expert (layer 1, expert 2) up"}
    assert all(p.file == e.file for p in problems)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        write_layout(tmp_path / "out", fail_at=3)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_must_be_a_layout(tmp_path: Path, layout_dir: Path) -> None:
    with pytest.raises(ConversionError, match="--force"):
        write_layout(layout_dir)
    write_layout(layout_dir, seed=1, force=True)  # replacing a layout is fine
    Layout.open(layout_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(ConversionError, match="not a mertools layout"):
        write_layout(precious, force=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_stale_partial_from_a_killed_run_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with LayoutWriter(out) as w:
            w.write_dense("x", EncodedTensor(np.zeros(64, np.uint8), "f32", (16,)))
            os.rename(w.partial, tmp_path / "stash")  # survive the abort, as after SIGKILL
            raise RuntimeError
    os.rename(tmp_path / "stash", tmp_path / "out.partial")
    with pytest.raises(LayoutError):
        Layout.open(tmp_path / "out.partial")  # no manifest: never a layout
    write_layout(out)
    Layout.open(out)
    assert not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- hostile manifests


def _edit(layout_dir: Path, fn) -> None:  # noqa: ANN001
    mpath = layout_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    fn(m)
    mpath.write_text(json.dumps(m))


HOSTILE = {
    "absolute path": (lambda m: m["experts"][0].update(file="/etc/passwd"), "relative"),
    "dotdot path": (lambda m: m["experts"][0].update(file="../outside.bin"), "relative"),
    "dotdot dense": (lambda m: m["dense"]["token_embd.weight"].update(file="experts/../../x"), "relative"),
    "duplicate expert": (lambda m: m["experts"].__setitem__(1, m["experts"][0]), "duplicate"),
    "missing expert": (lambda m: m["experts"].pop(), "missing"),
    "unaligned offset": (lambda m: m["experts"][0]["tensors"]["up"].update(offset=100), "multiple of 4096"),
    "overlap": (lambda m: m["experts"][0]["tensors"]["up"].update(offset=0), "overlap"),
    "beyond file": (lambda m: m["experts"][0]["tensors"]["down"].update(offset=1 << 30), "beyond"),
    "bad nbytes": (lambda m: m["experts"][0]["tensors"]["gate"].update(nbytes=7), "needs"),
    "unknown dtype": (lambda m: m["experts"][0]["tensors"]["gate"].update(dtype="q3_x"), "unknown dtype"),
    "shape vs config": (lambda m: m["config"].update(d_ff=128), "disagrees with config"),
    "bad version": (lambda m: m.update(version=99), "version"),
    "wrong format": (lambda m: m.update(format="other"), "format"),
    "bool offset": (lambda m: m["experts"][0]["tensors"]["gate"].update(offset=True), "bool"),
    "size mismatch": (lambda m: m["experts"][0].update(nbytes=m["experts"][0]["nbytes"] + 4096), "bytes"),
    "bad config": (lambda m: m["config"].update(n_heads=-1), "n_heads"),
    "unknown tokenizer kind": (lambda m: m["tokenizer"].update(kind="pickle"), "tokenizer.kind"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_on_open(layout_dir: Path, case: str) -> None:
    fn, match = HOSTILE[case]
    _edit(layout_dir, fn)
    with pytest.raises(LayoutError, match=match):
        Layout.open(layout_dir)


def test_symlink_leading_outside_is_refused(layout_dir: Path, tmp_path: Path) -> None:
    e = Layout.open(layout_dir).manifest.experts[0]
    target = tmp_path / "elsewhere.bin"
    os.replace(layout_dir / e.file, target)
    os.symlink(target, layout_dir / e.file)
    with pytest.raises(LayoutError, match="outside the layout"):
        Layout.open(layout_dir)


def test_truncated_and_missing_files_are_refused(layout_dir: Path) -> None:
    e = Layout.open(layout_dir).manifest.experts[4]
    os.truncate(layout_dir / e.file, e.nbytes - 4096)
    with pytest.raises(LayoutError, match="truncated"):
        Layout.open(layout_dir)
    os.remove(layout_dir / e.file)
    with pytest.raises(LayoutError, match="missing"):
        Layout.open(layout_dir)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b'{"format": "mertools.layout"}'])
def test_garbage_manifest_is_refused(layout_dir: Path, content: bytes) -> None:
    (layout_dir / "manifest.json").write_bytes(content)
    with pytest.raises(LayoutError):
        Layout.open(layout_dir)


def test_model_config_validation() -> None:
    good = CFG.to_dict()
    for key, bad in [("n_heads", 0), ("n_kv_heads", 3), ("n_experts_used", 9), ("rope_style", "x"), ("head_dim", 15)]:
        with pytest.raises(ValueError, match=key if key != "n_kv_heads" else "multiple"):
            ModelConfig.from_dict({**good, key: bad})
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**good, "surprise": 1})
    assert ModelConfig.from_dict(good) == CFG
