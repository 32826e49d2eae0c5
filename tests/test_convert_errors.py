"""Bad input to `mertools convert`: exit status 2, one line naming the file and tensor, nothing left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mertools.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_convert(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["convert", str(src), str(out), "--quiet", *extra])
    return res.exit_code, res.output


def assert_clean_failure(code: int, output: str, out: Path, *needles: str) -> None:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("mertools: error: "), output
    assert "Traceback" not in output
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def copy_hf(tiny: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny["hf"], tmp_path / "hf"))


def test_missing_source(tmp_path: Path) -> None:
    code, out = run_convert(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "nope", "no such file")


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello world")
    code, out = run_convert(tmp_path / "x.bin", tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "x.bin", "neither")


@pytest.mark.parametrize("keep", [3, 100, 5000, 2_000_000])
def test_truncated_gguf(tiny: dict, tmp_path: Path, keep: int) -> None:
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(tiny["q4_0"].read_bytes()[:keep])
    code, out = run_convert(bad, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "trunc.gguf")


def test_truncated_safetensors_names_tensor(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    shard = hf / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "model-00002-of-00002.safetensors", "tensor ", "truncated")


def test_corrupt_safetensors_header(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    shard = hf / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "model-00001-of-00002.safetensors", "header")


def test_missing_shard_and_missing_tensor(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    os.remove(hf / "model-00002-of-00002.safetensors")
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "model-00002-of-00002.safetensors", "missing")
    hf2 = copy_hf(tiny, tmp_path / "two")
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    shard = next(p for p in hf2.glob("*.safetensors") if name.encode() in p.read_bytes()[:100000])
    _rewrite_header(shard, lambda h: h.__setitem__(name[:-1] + "X", h.pop(name)))
    code, out = run_convert(hf2, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "missing tensor", name)


def test_unknown_architecture(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (hf / "config.json").write_text(json.dumps(cfg))
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", "config.json", "FalconForCausalLM")


def _rewrite_header(shard: Path, fn) -> None:  # noqa: ANN001
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # keep the data offsets valid
    if len(new) != n:
        raise ValueError("header grew")
    shard.write_bytes(data[:8] + new + data[8 + n:])


def test_unsupported_source_dtype_names_tensor(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight"
    shard = next(p for p in hf.glob("*.safetensors") if name.encode() in p.read_bytes()[:100000])
    _rewrite_header(shard, lambda h: h[name].update(dtype="I16"))
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", name, "I16")


def test_inconsistent_expert_shape_names_tensor(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    shard = next(p for p in hf.glob("*.safetensors") if name.encode() in p.read_bytes()[:100000])
    _rewrite_header(shard, lambda h: h[name].update(shape=[256, 512]))  # transposed, same byte count
    code, out = run_convert(hf, tmp_path / "out")
    assert_clean_failure(code, out, tmp_path / "out", name, "[256, 512]", "[512, 256]")


def test_nan_weights_name_tensor(tiny: dict, tmp_path: Path) -> None:
    hf = copy_hf(tiny, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    shard = next(p for p in hf.glob("*.safetensors") if name.encode() in p.read_bytes()[:100000])
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[8 + n + begin + 200: 8 + n + begin + 202] = b"\x00\x7e"  # f16 NaN
    shard.write_bytes(bytes(data))
    for dtype in ("q4_0", "f16"):
        code, out = run_convert(hf, tmp_path / "out", "--dtype", dtype)
        assert_clean_failure(code, out, tmp_path / "out", name, "NaN")


def test_existing_output_refused_without_force(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = run_convert(tiny["hf"], out)
    assert code == 2 and "--force" in text
    code, text = run_convert(tiny["hf"], out, "--force")
    assert code == 2 and "not a mertools layout" in text
    assert (out / "keep.txt").read_text() == "mine"


def _slow_source(tmp_path: Path) -> Path:
    """A source whose conversion takes a few seconds: small layers, requantized to q4_k (~1 s a layer here: the
    interrupt lands after layer 1's files, with 8 layers still to go)."""
    from fixtures.tiny_mixtral import synth_mixtral_gguf

    return synth_mixtral_gguf(tmp_path / "slow.gguf", 10, seed=1, d_model=256, d_ff=1024, n_expert=8,
                              n_head=4, n_kv=2, vocab=1024)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_conversion_leaves_no_layout_and_rerun_succeeds(tmp_path: Path, sig: signal.Signals) -> None:
    src = _slow_source(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mertools.cli", "convert", str(src), str(out), "--dtype", "q4_k", "--quiet"]
    # a shell that starts the suite in the background hands its children SIGINT ignored; Ctrl-C is what is tested
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = out.with_name("out.partial")
    deadline = time.monotonic() + 120
    while not any(partial.glob("experts/layer_001/*.bin")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not (out / "manifest.json").exists() and not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert not partial.exists()
    else:
        assert not (partial / "manifest.json").exists()  # left behind, but never a layout
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (out / "manifest.json").exists() and not partial.exists()
