"""No pickle and no code from model files, ever: a pickle-only checkpoint is refused without being
opened, and remote-code hooks (`auto_map`, `trust_remote_code`, a modeling_*.py beside the weights)
are never imported, by convert, inspect, verify (numpy or transformers reference) or run. Each planted
payload would create a marker file if it ever ran."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mertools.cli import main


class _Payload:
    """Unpickling this calls open(marker, "w"): proof that somebody unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def plant(hf: Path, marker: Path) -> None:
    """Every code-execution hook a HF directory can carry, each touching `marker` if it runs."""
    data = pickle.dumps({"model.embed_tokens.weight": _Payload(marker)})
    for name in ("pytorch_model.bin", "model.pt", "training_args.pkl", "optimizer.pt"):
        (hf / name).write_bytes(data)
    code = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py", "__init__.py"):
        (hf / name).write_text(code)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    cfg["trust_remote_code"] = True
    (hf / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((hf / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (hf / "tokenizer_config.json").write_text(json.dumps(tcfg))


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_a_pickle_only_checkpoint_is_refused_unopened(tiny: dict, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["hf"] / name, hf / name)
    marker = tmp_path / "pwned"
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for args in (("convert", str(hf), str(tmp_path / "out"), "--quiet"), ("inspect", str(hf))):
        code, out = cli(*args)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "pytorch_model.bin" in lines[0] and "pickle" in lines[0], out
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_remote_code_hooks_and_planted_pickles_never_run(tiny: dict, tmp_path: Path) -> None:
    hf = Path(shutil.copytree(tiny["hf"], tmp_path / "hf"))
    marker = tmp_path / "pwned"
    plant(hf, marker)
    out = tmp_path / "lay"
    assert cli("convert", str(hf), str(out), "--quiet", "--dtype", "q8_0")[0] == 0
    assert cli("inspect", str(hf))[0] == 0
    assert cli("verify", str(out), "--reference", str(hf), "--max-tokens", "16", "--quiet", "--min-top1", "0",
               "--max-ppl-ratio", "2", "--max-kl", "1")[0] == 0
    assert cli("run", str(out), "-n", "2", "--cache-mb", "64")[0] == 0
    assert not marker.exists()


def test_the_transformers_reference_loads_safetensors_only(tiny: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    hf = Path(shutil.copytree(tiny["hf"], tmp_path / "hf"))
    marker = tmp_path / "pwned"
    plant(hf, marker)
    seen: list[dict] = []
    real = transformers.MixtralForCausalLM.from_pretrained.__func__

    def spy(cls, path, *a, **kw):  # noqa: ANN001, ANN202 - records how the reference loads, then loads
        seen.append({"path": str(path), **kw})
        return real(cls, path, *a, **kw)

    monkeypatch.setattr(transformers.MixtralForCausalLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "lay"
    assert cli("convert", str(hf), str(out), "--quiet")[0] == 0
    code, text = cli("verify", str(out), "--reference", str(hf), "--reference-engine", "transformers",
                     "--max-tokens", "8", "--quiet")
    assert code == 0, text
    assert seen and all(s["use_safetensors"] is True and s["trust_remote_code"] is False for s in seen)
    assert all(not s["path"].startswith(str(hf)) for s in seen)  # a directory we wrote, not the source's
    assert not marker.exists()
