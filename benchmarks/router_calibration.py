"""Give a random-weight checkpoint routers that route diversely, so that mertools and llama.cpp, each
running the checkpoint's own router on the same token stream, see the same realistic expert traffic.

Random routers on random weights send every token to the same two experts per layer: the hidden
states share a large common component, and random router rows mostly see that. Here, layer by layer,
the hidden states entering the router are sampled over diverse tokens (through mertools' own forward
pass, earlier layers already recalibrated: the model hands each MoE layer's input to a prefetcher of
ours, given to `Engine.open`, and it is normalised here as the runtime does), and each expert's router
row is set to a random mix of the *centred* states, orthogonal to their mean, scaled so router logits
vary by `logit_std` across tokens. The new rows are written into the GGUF in place (same shape, F32),
then the layout is converted again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mertools.runtime.prefetch import Prefetcher


class _InputCapture(Prefetcher):
    """A prefetcher (given to `Engine.open` as its factory) that guesses nothing and keeps the MoE input x
    (n, d_model) of layer `layer`: the model hands every MoE layer's input to its prefetcher."""

    def __init__(self) -> None:
        self.layer, self.x = -1, None

    def guess(self, layer: int, chosen: np.ndarray, hidden: np.ndarray, k: int) -> list[int]:
        if layer == self.layer:
            self.x = np.array(hidden, dtype=np.float32)
        return []


def router_rows(h: np.ndarray, n_experts: int, rng: np.random.Generator, logit_std: float = 2.0) -> np.ndarray:
    """One layer's calibrated router (n_experts, d_model) float32 from the states h (n, d_model) it routes: each
    expert's row a random mix of the centred states, blind to their common component, scaled so that its logits
    vary by `logit_std` across the tokens."""
    mean = h.mean(axis=0)
    hc = h - mean  # (n, d)
    w = rng.standard_normal((n_experts, len(h))) @ hc / len(h)  # (E, d) mixes of centred states
    unit = mean / np.linalg.norm(mean)
    w -= np.outer(w @ unit, unit)  # blind to the common component
    w *= logit_std / (hc @ w.T).std(axis=0)[:, None]
    return w.astype(np.float32)


def calibrate_routers(gguf_path: Path, layout_dir: Path, ids: list[int], seed: int = 0,
                      logit_std: float = 2.0) -> list[np.ndarray]:
    """New router matrices (n_experts, d_model) per layer, computed over the token ids `ids`."""
    from mertools.runtime.engine import Engine

    capture = _InputCapture()
    rng = np.random.default_rng(seed)
    routers = []
    with Engine.open(layout_dir, prefetch=lambda router: capture) as eng:
        cfg = eng.config
        for layer in range(cfg.n_layers):
            capture.layer, capture.x = layer, None
            eng.reset()
            eng.forward(ids, all_logits=False)  # the whole stack: hooks cannot stop a forward half way
            if capture.x is None:
                raise RuntimeError(f"layer {layer}: the model gave its prefetcher no input to capture")
            # the router's input, normalised as the runtime's rms_norm does (float32 mean of squares)
            x, norm = capture.x, eng.model.layers[layer].ffn_norm
            var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
            h = ((x / np.sqrt(var + np.float32(cfg.norm_eps))) * norm).astype(np.float64)  # (n, d_model)
            w = router_rows(h, cfg.n_experts, rng, logit_std)
            eng.model.layers[layer].router[...] = w  # in place: later layers are calibrated on this layer's routing
            routers.append(w)
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
