"""The plain-numpy reference forward pass: equal across sources and layouts, equal to HF transformers.

The transformers checks need torch + transformers (the `reference` extra) and skip without them.
Measured on the tiny fixture (8 prompts of 20 tokens, float32 torch vs float64 numpy, eager and
sdpa attention): max |logit diff| <= 4.4e-6 with |logits| <= 4.6 (default and sliding-window
variants), 7.3e-5 with |logits| <= 204 (tied embeddings: the std-1 embedding is the lm_head); at
most 1.1e-6 relative to the largest logit, top-1 identical everywhere. The bound used is 1e-5
relative to the largest logit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fixtures.gguf_common import permute_qk
from fixtures.tiny_mixtral import TinyConfig, build_hf
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.reference import ReferenceModel

PROMPT_LEN = 20
SLIDING_WINDOW = 5  # much shorter than the prompts, so the window changes most positions
HF_REL_BOUND = 1e-5  # max |diff| / max |logit| against transformers (measured <= 1.1e-6)


def prompts(n: int = 3, length: int = PROMPT_LEN, vocab: int = 512) -> list[list[int]]:
    """Seeded prompts: BOS then random non-special ids."""
    rng = np.random.default_rng(1234)
    return [[1] + rng.integers(3, vocab, length - 1).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def ref_hf(tiny: dict[str, Path]) -> ReferenceModel:
    return ReferenceModel.from_source(tiny["hf"])


@pytest.fixture(scope="module")
def variants(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF dirs of the tiny model: default, with a sliding window, with tied embeddings (same seed)."""
    out = tmp_path_factory.mktemp("reference-variants")
    return {
        "default": tiny["hf"],
        "sliding_window": build_hf(out / "swa", cfg=TinyConfig(sliding_window=SLIDING_WINDOW), seed=0),
        "tied": build_hf(out / "tied", cfg=TinyConfig(tie_word_embeddings=True), seed=0),
    }


# ---------------------------------------------------------------- sources and layouts agree
def test_hf_and_gguf_sources_give_identical_logits(tiny: dict[str, Path], ref_hf: ReferenceModel) -> None:
    merged = ReferenceModel.from_source(tiny["f16"])
    per_expert = ReferenceModel.from_source(tiny["f16_per_expert"])
    for ids in prompts():
        want = ref_hf.forward(ids)
        assert want.shape == (len(ids), 512) and want.dtype == np.float32
        np.testing.assert_array_equal(merged.forward(ids), want)
        np.testing.assert_array_equal(per_expert.forward(ids), want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_float_dtypes_give_identical_logits(tmp_path: Path, ref_hf: ReferenceModel, dtype: str) -> None:
    # the fixture's values are exact in bf16, f16 and f32, so every float checkpoint is the same model
    m = ReferenceModel.from_source(build_hf(tmp_path / dtype, seed=0, dtype=dtype, shards=1))
    ids = prompts(1)[0]
    np.testing.assert_array_equal(m.forward(ids), ref_hf.forward(ids))


def test_qk_row_order_matters(tiny: dict[str, Path], ref_hf: ReferenceModel) -> None:
    """Left in llama.cpp's order, the q/k rows would change the logits: the test above has teeth."""
    m = ReferenceModel.from_source(tiny["f16"])
    c = m.config
    m.layers = [replace(lw, attn_q=permute_qk(lw.attn_q, c.n_heads), attn_k=permute_qk(lw.attn_k, c.n_heads, c.n_kv_heads))
                for lw in m.layers]
    ids = prompts(1)[0]
    assert np.abs(m.forward(ids)[1:] - ref_hf.forward(ids)[1:]).max() > 0.1  # position 0 has no rotation


@pytest.mark.parametrize("src,dtype", [("hf", "f16"), ("q4_0", "auto")])
def test_from_layout_equals_from_source(tiny: dict[str, Path], tmp_path: Path, src: str, dtype: str) -> None:
    # f16 from HF and q4_0 copied from its GGUF are lossless conversions: the weights, hence logits, match
    layout = convert(tiny[src], tmp_path / "layout", ConvertOptions(dtype=dtype, progress=False)).out
    a, b = ReferenceModel.from_layout(layout), ReferenceModel.from_source(tiny[src])
    assert a.config == b.config
    for ids in prompts(2):
        np.testing.assert_array_equal(a.forward(ids), b.forward(ids))


# ---------------------------------------------------------------- quantized sources
def test_quantized_logits_close_to_f16(tiny: dict[str, Path], ref_hf: ReferenceModel) -> None:
    """Sanity, not exactness. Every matrix of these GGUFs is quantized (embeddings and lm_head too);
    q4_0 loses ~8.6% of each tensor's norm and this random model's top-1/top-2 logit gaps are small
    (median ~0.2 for logits of std 1). Measured over 8 prompts: q4_0 keeps top-1 at 60% of positions
    (chance: 0.2%), the f16 top-1 in its top 5 at 94%, relative error <= 0.32, mean cosine 0.956;
    q8_0: 96%, 100%, <= 0.076, 0.999. The bounds leave room below those."""
    ids = prompts(8)
    want = [ref_hf.forward(p) for p in ids]
    limits = {"q4_0": (0.4, 0.8, 0.45, 0.9), "q8_0": (0.85, 0.95, 0.12, 0.99)}
    for qtype, (min_top1, min_top5, max_rel, min_cos) in limits.items():
        m = ReferenceModel.from_source(tiny[qtype])
        pairs = [(m.forward(p), w) for p, w in zip(ids, want, strict=True)]
        top1 = np.mean([(g.argmax(-1) == w.argmax(-1)).mean() for g, w in pairs])
        top5 = np.mean([(np.argsort(-g, axis=-1)[:, :5] == w.argmax(-1)[:, None]).any(-1).mean() for g, w in pairs])
        rel = max(np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in pairs)
        cos = np.mean([((g * w).sum(-1) / np.linalg.norm(g, axis=-1) / np.linalg.norm(w, axis=-1)).mean() for g, w in pairs])
        assert top1 >= min_top1 and top5 >= min_top5, (qtype, top1, top5)
        assert rel <= max_rel and cos >= min_cos, (qtype, rel, cos)


# ---------------------------------------------------------------- sliding window (no torch needed)
def test_sliding_window_mask(variants: dict[str, Path], ref_hf: ReferenceModel) -> None:
    m = ReferenceModel.from_source(variants["sliding_window"])
    assert m.config.sliding_window == SLIDING_WINDOW
    mask = m.attention_mask(PROMPT_LEN)
    for i in range(PROMPT_LEN):  # HF: query i sees keys max(0, i - window + 1) .. i
        assert np.flatnonzero(mask[i]).tolist() == list(range(max(0, i - SLIDING_WINDOW + 1), i + 1))
    ids = prompts(1)[0]
    windowed, full = m.forward(ids), ref_hf.forward(ids)  # same weights (same seed)
    np.testing.assert_array_equal(windowed[:SLIDING_WINDOW], full[:SLIDING_WINDOW])
    assert np.abs(windowed[SLIDING_WINDOW:] - full[SLIDING_WINDOW:]).max(axis=-1).min() > 1e-3
    # a window at least as long as the prompt is no window at all
    m.config = dataclasses.replace(m.config, sliding_window=PROMPT_LEN)
    np.testing.assert_array_equal(m.forward(ids), full)


def test_float32_compute_close_to_float64(ref_hf: ReferenceModel, tiny: dict[str, Path]) -> None:
    m32 = ReferenceModel.from_source(tiny["hf"], compute_dtype=np.float32)
    for ids in prompts(2):
        want = ref_hf.forward(ids)
        assert np.abs(m32.forward(ids) - want).max() <= HF_REL_BOUND * np.abs(want).max()


def test_rejects_bad_token_ids(ref_hf: ReferenceModel) -> None:
    for bad in ([], [0, 512], [-1]):
        with pytest.raises(ValueError):
            ref_hf.forward(bad)


# ---------------------------------------------------------------- HF transformers
@pytest.fixture(scope="module")
def hf_logits(variants: dict[str, Path]):  # noqa: ANN201 - a function (variant, attn impl, ids) -> logits
    torch = pytest.importorskip("torch", reason="torch is not installed (the `reference` extra)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the `reference` extra)")
    # transformers 5 renamed torch_dtype to dtype
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    cache: dict[tuple[str, str], object] = {}

    def run(variant: str, impl: str, ids: list[int]) -> np.ndarray:
        if (variant, impl) not in cache:
            model = transformers.MixtralForCausalLM.from_pretrained(
                variants[variant], attn_implementation=impl, **{dtype_kw: torch.float32})
            cache[(variant, impl)] = model.eval()
        with torch.no_grad():
            out = cache[(variant, impl)](torch.tensor([ids], dtype=torch.long))
        return out.logits[0].float().numpy()  # (T, vocab)

    return run


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["default", "sliding_window", "tied"])
def test_matches_transformers(hf_logits, variants: dict[str, Path], variant: str, impl: str) -> None:  # noqa: ANN001
    ref = ReferenceModel.from_source(variants[variant])
    for ids in prompts():
        want = hf_logits(variant, impl, ids)
        got = ref.forward(ids)
        diff = np.abs(got - want).max()
        assert diff <= HF_REL_BOUND * np.abs(want).max(), f"{variant}/{impl}: max |diff| {diff}"
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
