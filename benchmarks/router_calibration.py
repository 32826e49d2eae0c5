"""Give a random-weight checkpoint routers that route diversely, so that mertools and llama.cpp, each
running the checkpoint's own router on the same token stream, see the same realistic expert traffic.

Random routers on random weights send every token to the same two experts per layer: the hidden
states share a large common component, and random router rows mostly see that. Here, layer by layer,
the hidden states entering the router are sampled over diverse tokens (through mertools' own forward
pass, earlier layers already recalibrated), and each expert's router row is set to a random mix of the
*centred* states, orthogonal to their mean, scaled so router logits vary by `logit_std` across tokens.
The new rows are written into the GGUF in place (same shape, F32), then the layout is converted again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Captured(Exception):
    """Raised from the router hook once layer `layer`'s inputs are captured: the rest is not needed."""


def calibrate_routers(gguf_path: Path, layout_dir: Path, ids: list[int], seed: int = 0,
                      logit_std: float = 2.0) -> list[np.ndarray]:
    """New router matrices (n_experts, d_model) per layer, computed over the token ids `ids`."""
    from mertools.runtime.engine import Engine

    eng = Engine.open(layout_dir, prefetch="none")
    model, cfg = eng.model, eng.config
    rng = np.random.default_rng(seed)
    original = model.router_probs
    routers = []
    for layer in range(cfg.n_layers):
        got: dict[str, np.ndarray] = {}

        def hook(la: int, h: np.ndarray, layer: int = layer, got: dict = got) -> np.ndarray:
            if la == layer:
                got["h"] = np.array(h, dtype=np.float64)  # (n, d_model) normalised router inputs
                raise _Captured
            return original(la, h)

        model.router_probs = hook
        eng.reset()
        try:
            eng.forward(ids, all_logits=False)
        except _Captured:
            pass
        h = got["h"]
        mean = h.mean(axis=0)
        hc = h - mean  # (n, d)
        w = rng.standard_normal((cfg.n_experts, len(ids))) @ hc / len(ids)  # (E, d) mixes of centred states
        unit = mean / np.linalg.norm(mean)
        w -= np.outer(w @ unit, unit)  # blind to the common component
        logits = hc @ w.T  # (n, E)
        w *= logit_std / logits.std(axis=0)[:, None]
        w = w.astype(np.float32)
        model.layers[layer]["router"] = w  # later layers are calibrated on this layer's new routing
        routers.append(w)
    model.router_probs = original
    eng.close()
    return routers


def write_routers(gguf_path: Path, routers: list[np.ndarray]) -> None:
    """Overwrite each layer's `blk.N.ffn_gate_inp.weight` (F32, same shape) in the GGUF file."""
    import gguf

    reader = gguf.GGUFReader(gguf_path, "r+")
    by_name = {t.name: t for t in reader.tensors}
    for layer, w in enumerate(routers):
        t = by_name[f"blk.{layer}.ffn_gate_inp.weight"]
        if t.data.shape != w.shape:
            raise ValueError(f"{gguf_path}: blk.{layer}.ffn_gate_inp.weight is {t.data.shape}, router is {w.shape}")
        t.data[...] = w
    reader.data.flush()


def diverse_checkpoint(base_gguf: Path, out_gguf: Path, out_layout: Path, ids: list[int], seed: int = 0) -> None:
    """Copy `base_gguf` to `out_gguf` with calibrated routers, and convert it to `out_layout`."""
    import shutil

    from mertools.convert.pipeline import ConvertOptions, convert

    tmp_layout = out_layout.with_name(out_layout.name + ".base")
    convert(base_gguf, tmp_layout, ConvertOptions(force=True, progress=False))
    routers = calibrate_routers(base_gguf, tmp_layout, ids, seed)
    shutil.rmtree(tmp_layout)
    partial = out_gguf.with_name(out_gguf.name + ".partial")
    shutil.copyfile(base_gguf, partial)
    write_routers(partial, routers)
    convert(partial, out_layout, ConvertOptions(force=True, progress=False))
    partial.rename(out_gguf)  # last: an existing out_gguf means both are complete
