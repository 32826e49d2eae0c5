"""Multi-token prediction: checkpoints' MTP (nextn) blocks kept by `convert --mtp`, run by the runtime as the
float64 reference runs them, and used as a drafter (`--draft mtp`) without changing a single greedy token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.tiny_families import build_gguf, build_hf
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import RuntimeConfigError, SourceError
from mertools.layout import Layout
from mertools.layout.manifest import Manifest, ManifestError
from mertools.reference import ReferenceModel
from mertools.runtime.engine import Engine
from mertools.runtime.mtp import MtpDrafter
from mertools.runtime.ops import rms_norm
from mertools.runtime.sampling import Sampler, SamplingParams

FAMILIES = ("deepseek_v3", "glm4_moe")
IDS = [1, 5, 9, 33, 7, 12, 40, 3, 77, 15, 2, 8, 61, 19]


@pytest.fixture(scope="module")
def mtp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("mtp")
    res = {}
    for fam in FAMILIES:
        hf = build_hf(fam, out / f"{fam}-hf")
        d = {"hf": hf, "f16": convert(hf, out / f"{fam}-f16", ConvertOptions(dtype="f16", mtp=True, progress=False)).out,
             "q8_0": convert(hf, out / f"{fam}-q8", ConvertOptions(dtype="q8_0", mtp=True, progress=False)).out,
             "plain": convert(hf, out / f"{fam}-plain", ConvertOptions(dtype="f16", progress=False)).out}
        if fam == "glm4_moe":  # llama.cpp's GLM GGUFs carry the nextn block (its deepseek2 ones leave it out)
            d["gguf"] = build_gguf(hf, out / f"{fam}.gguf", "f16")
            d["f16_gguf"] = convert(d["gguf"], out / f"{fam}-f16-gguf", ConvertOptions(mtp=True, progress=False)).out
        res[fam] = d
    return res


# ---------------------------------------------------------------- the layout
@pytest.mark.parametrize("fam", FAMILIES)
def test_convert_keeps_the_mtp_block_only_when_asked(mtp: dict, fam: str) -> None:
    m = Layout.open(mtp[fam]["f16"]).manifest
    c = m.config
    assert (c.n_layers, c.nextn_layers, c.mtp_layers) == (3, 1, (3,))
    assert {e.layer for e in m.experts} == {1, 2, 3} and len(m.experts) == 3 * c.n_experts
    own = {n for n in m.dense if n.startswith("blk.3.nextn.")}
    base = {"blk.3.nextn.eh_proj.weight", "blk.3.nextn.enorm.weight", "blk.3.nextn.hnorm.weight",
            "blk.3.nextn.shared_head_norm.weight"}
    # DeepSeek's block holds its own embedding and head; GLM's reuses the model's
    assert own == (base | {"blk.3.nextn.embed_tokens.weight", "blk.3.nextn.shared_head_head.weight"}
                   if fam == "deepseek_v3" else base)
    assert tuple(m.dense["blk.3.nextn.eh_proj.weight"].shape) == (c.d_model, 2 * c.d_model)
    assert "blk.3.attn_norm.weight" in m.dense and "blk.3.ffn_gate_inp.weight" in m.dense  # a whole MoE layer
    plain = Layout.open(mtp[fam]["plain"]).manifest
    assert plain.config.nextn_layers == 0 and not [n for n in plain.dense if n.startswith("blk.3.")]
    assert plain.config.to_dict() == {k: v for k, v in c.to_dict().items() if k != "nextn_layers"}


def test_glm_gguf_and_hf_give_the_same_mtp_block(mtp: dict) -> None:
    a, b = Layout.open(mtp["glm4_moe"]["f16"]), Layout.open(mtp["glm4_moe"]["f16_gguf"])
    assert a.manifest.config == b.manifest.config
    for name in (n for n in a.manifest.dense if n.startswith("blk.3.")):
        assert a.read_dense(name).tobytes() == b.read_dense(name).tobytes(), name
    for e in (e for e in a.manifest.experts if e.layer == 3):
        assert (a.root / e.file).read_bytes() == (b.root / e.file).read_bytes()


def test_a_checkpoint_without_mtp_is_refused(mtp: dict, tmp_path: Path) -> None:
    gguf = build_gguf(mtp["deepseek_v3"]["hf"], tmp_path / "ds.gguf", "f16")  # llama.cpp's deepseek2: no nextn
    with pytest.raises(SourceError, match=r"ds\.gguf: has no multi-token-prediction"):
        convert(gguf, tmp_path / "out", ConvertOptions(mtp=True, progress=False))
    assert not (tmp_path / "out").exists()
    res = subprocess.run([sys.executable, "-m", "mertools.cli", "convert", str(gguf), str(tmp_path / "out"), "--mtp"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "has no multi-token-prediction" in res.stderr and not (tmp_path / "out").exists()


def test_the_manifest_grid_covers_the_mtp_block(mtp: dict) -> None:
    d = json.loads((mtp["glm4_moe"]["f16"] / "manifest.json").read_text())
    d["experts"] = [e for e in d["experts"] if e["layer"] != 3]
    with pytest.raises(ManifestError, match="missing 8 entries"):
        Manifest.from_dict(d)
    d = json.loads((mtp["glm4_moe"]["f16"] / "manifest.json").read_text())
    d["config"]["nextn_layers"] = -1
    with pytest.raises(ManifestError, match="nextn_layers"):
        Manifest.from_dict(d)


# ---------------------------------------------------------------- the block's numbers
def _runtime_mtp(eng: Engine, ids: list[int]) -> np.ndarray:
    """The block over a whole sequence at once: row p joins the state at p with token p + 1."""
    eng.reset()
    eng.forward(ids)
    m = eng.model
    states = rms_norm(m.last_x, m.weights.output_norm, m.cfg.norm_eps).astype(np.float32)
    logits, _ = m.mtp_forward(m.new_mtp_kv(), np.asarray(ids[1:]), states[:-1])
    return logits


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_the_block_matches_the_float64_reference(mtp: dict, fam: str, dtype: str) -> None:
    ref = (ReferenceModel.from_source(mtp[fam]["hf"], mtp=True) if dtype == "f16"
           else ReferenceModel.from_layout(mtp[fam][dtype]))  # the quantized weights exactly as the layout holds them
    want = ref.mtp(IDS)
    with Engine.open(mtp[fam][dtype], kv_dtype="f32") as eng:
        got = _runtime_mtp(eng, IDS)
    assert got.shape == (len(IDS) - 1, ref.config.vocab_size)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_row_0_reads_no_token(mtp: dict) -> None:
    """Position 0 has no token before it: its embedding is zeroed (as vLLM's MTP does), so token 1 does not move
    row 0 of the reference (the rest of the sequence does move), nor the runtime's beyond rounding."""
    ref = ReferenceModel.from_source(mtp["deepseek_v3"]["hf"], mtp=True)
    other = IDS[:1] + [(IDS[1] + 1) % 512] + IDS[2:]
    a, b = ref.mtp(IDS), ref.mtp(other)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[1:] - b[1:]).max() > 0
    with Engine.open(mtp["deepseek_v3"]["f16"], kv_dtype="f32") as eng:
        r0, r1 = _runtime_mtp(eng, IDS)[0], _runtime_mtp(eng, other)[0]
    # within float32 rounding only: the rows sharing an expert with row 0 change with token 1, and how many there
    # are picks the kernel (a matvec per row, or the tiled one), so the bits may differ
    assert np.abs(r0 - r1).max() <= 1e-5 * np.abs(r0).max()


@pytest.mark.parametrize("piece", ["hnorm", "enorm", "order of the halves", "head norm", "the block's own head"])
def test_each_piece_of_the_block_matters(mtp: dict, piece: str) -> None:
    """Spoiling one piece of the reference moves it far from the runtime: the match above is not vacuous."""
    ref = ReferenceModel.from_source(mtp["deepseek_v3"]["hf"], mtp=True)
    lw = ref.mtp_layers[0]
    if piece in ("hnorm", "enorm"):
        object.__setattr__(lw, f"mtp_{piece}", getattr(lw, f"mtp_{piece}") * 1.5)
    elif piece == "order of the halves":
        w, half = lw.mtp_eh_proj, lw.mtp_eh_proj.shape[1] // 2
        object.__setattr__(lw, "mtp_eh_proj", np.concatenate([w[:, half:], w[:, :half]], axis=1))
    elif piece == "head norm":
        object.__setattr__(lw, "mtp_head_norm", lw.mtp_head_norm[::-1].copy())
    else:
        object.__setattr__(lw, "mtp_head", None)  # the model's lm_head instead of the block's
    with Engine.open(mtp["deepseek_v3"]["f16"], kv_dtype="f32") as eng:
        got = _runtime_mtp(eng, IDS)
    spoiled = ref.mtp(IDS)
    assert np.abs(got - spoiled).max() > 1e-2 * np.abs(spoiled).max()


# ---------------------------------------------------------------- the drafter
@pytest.mark.parametrize("fam", FAMILIES)
def test_proposals_are_the_blocks_predictions(mtp: dict, fam: str) -> None:
    """Fed incrementally (the prompt's states, then one proposal), the drafter's first token is the block's argmax
    over the whole sequence, at every length."""
    with Engine.open(mtp[fam]["f16"], kv_dtype="f32") as eng:
        want = _runtime_mtp(eng, IDS).argmax(1)
        greedy = Sampler(SamplingParams())
        for n in (2, 5, 9, len(IDS)):
            d = MtpDrafter(eng.model)
            eng.reset()
            eng.forward(IDS[:n - 1])
            d.observe(0, IDS[:n - 1], eng.model.last_x)
            before = d.kv.length
            draft = d.propose(IDS[:n], 3, greedy)
            assert len(draft.tokens) == 3 and draft.tokens[0] == want[n - 2]
            assert d.kv.length == before == n - 2  # the proposal's positions were dropped again


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_the_same_with_mtp_drafts(mtp: dict, fam: str, k: int) -> None:
    lay = mtp[fam]["q8_0"]
    slot = max(e.nbytes for e in Layout.open(lay).manifest.experts) / 2**20
    for cache_mb in (None, 5 * slot):  # every expert resident, and a cache that streams (the block's experts too)
        with Engine.open(lay, cache_mb=cache_mb) as eng:
            plain = [t.id for t in eng.generate(IDS, max_tokens=20)]
            d = eng.open_drafter("mtp")
            got = [t.id for t in eng.generate(IDS, max_tokens=20, draft=d, draft_tokens=k)]
            assert got == plain
            assert eng.spec.steps > 0 and eng.spec.drafted > 0
            assert d.kv.length == d.last_pos  # every pair whose successor is known, nothing more


def test_sampled_generation_with_mtp_drafts_runs_and_reports(mtp: dict) -> None:
    with Engine.open(mtp["glm4_moe"]["q8_0"]) as eng:
        d = eng.open_drafter("mtp")
        toks = list(eng.generate(IDS, max_tokens=16, temperature=0.8, seed=3, draft=d, draft_tokens=3))
        assert len(toks) == 16 and eng.spec.drafted > 0 and eng.stats()["spec_steps"] == eng.spec.steps


def test_mtp_drafts_need_the_block(mtp: dict) -> None:
    with Engine.open(mtp["glm4_moe"]["plain"]) as eng:
        with pytest.raises(RuntimeConfigError, match="has no multi-token-prediction layers for --draft mtp.*--mtp"):
            eng.open_drafter("mtp")


def test_cli_run_and_serve(mtp: dict) -> None:
    lay = str(mtp["glm4_moe"]["q8_0"])
    run = [sys.executable, "-m", "mertools.cli", "run", lay, "-p", "hello", "-n", "12"]
    plain = subprocess.run(run, capture_output=True, text=True, timeout=300)
    drafted = subprocess.run([*run, "--draft", "mtp", "--draft-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and "speculate" in drafted.stderr
    shown = subprocess.run([sys.executable, "-m", "mertools.cli", "inspect", lay], capture_output=True, text=True, timeout=120)
    assert "1 multi-token-prediction block after the main layers (layer 3): run --draft mtp" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "mertools.cli", "serve", str(mtp["glm4_moe"]["plain"]), "--draft", "mtp",
                          "--port", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no multi-token-prediction layers" in bad.stderr


def test_the_server_drafts_with_the_block(mtp: dict) -> None:
    """Concurrent greedy completions through the server with --draft mtp (a block KV cache per sequence, fed the
    rows of each batch step): each the text the engine gives alone; drafts counted on /metrics."""
    from family_checks import serve_concurrently

    lay = mtp["deepseek_v3"]["q8_0"]
    prompts = ["hello there", "ROMEO: I will go", "a b c d e f g", "JULIET:"]
    with Engine.open(lay) as eng:
        want = ["".join(t.text for t in eng.generate(p, max_tokens=16)) for p in prompts]
    got, text = serve_concurrently(lay, prompts, 16, max_concurrency=4, draft="mtp", draft_tokens=3)
    assert got == want
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("mertools_draft")}
    assert values["mertools_draft_tokens_total"] > 0
