"""The target's own multi-token-prediction block as the drafter (`--draft mtp`; DeepSeek-V3's and GLM-4.5's
nextn layers, kept by `convert --mtp`).

The block at position p joins the target's final hidden state h_p with the token t_{p+1} and predicts t_{p+2}
(MoEModel.mtp_forward). Its one-layer KV cache holds such a pair for every position whose successor is known: the
drafter is told every state the target computes with its token (`observe`: the prompt's chunks, then the accepted
rows of each verification step) and feeds the pairs at once, keeping only the last state, whose successor is not
known yet. A proposal joins that state with the newest token, chains on the block's own output for further tokens,
and then drops all it added: the target's states replace the block's guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .ops import rms_norm
from .speculative import Draft

if TYPE_CHECKING:
    from .model import MoEModel
    from .sampling import Sampler


class MtpDrafter:
    name = "mtp"

    def __init__(self, model: MoEModel) -> None:
        if not model.cfg.nextn_layers:
            raise ValueError("the layout has no multi-token-prediction blocks")
        self.model = model
        self.kv = model.new_mtp_kv()
        self.last: np.ndarray | None = None  # (1, d_model): the newest target state, normed, its successor unknown
        self.last_pos = -1

    def observe(self, start: int, ids: Sequence[int], x: np.ndarray) -> None:
        """The target computed positions start.. for tokens `ids`, with final hidden states x (n, d_model) before its
        output norm. Anything the block held from position start - 1 on is stale (a new request, or rows the target
        rejected) and is recomputed."""
        m = self.model
        states = rms_norm(x, m.weights.output_norm, m.cfg.norm_eps).astype(np.float32)
        tokens = np.asarray(ids, np.int64)
        if self.last is not None and self.last_pos == start - 1 and self.kv.length >= start - 1:
            first, states = start - 1, np.concatenate([self.last, states])  # the held state meets its successor
        else:
            first, tokens = start, tokens[1:]  # nothing held before `start`: its first pair is (x[0], ids[1])
        self.kv.length = min(self.kv.length, first)
        self.last, self.last_pos = states[-1:], start + len(ids) - 1
        if self.kv.length == first and len(tokens):
            self.kv.reserve(first + len(tokens) + 1)
            m.mtp_forward(self.kv, tokens, states[:-1])

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        """Up to k tokens after `context`, whose last token (position P) the target has not seen: the block joins the
        state at P - 1 with it, then chains on its own output."""
        m, kv = self.model, self.kv
        pos = len(context) - 1
        k = max(0, min(k, m.cfg.context_length - len(context)))
        if k == 0 or self.last is None or self.last_pos != pos - 1 or kv.length != pos - 1:
            return Draft([])  # the target's state before the newest token is not known here
        kv.reserve(pos + k)
        logits, h = m.mtp_forward(kv, np.asarray(context[-1:], np.int64), self.last)
        tokens: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(k):
            if sampler.params.temperature == 0:
                tokens.append(int(np.argmax(logits[-1])))
            else:
                q = sampler.distribution(logits[-1])
                dists.append(q)
                tokens.append(sampler.draw(q))
            if i < k - 1:  # chain on the block's own output
                logits, h = m.mtp_forward(kv, np.asarray(tokens[-1:], np.int64), h)
        kv.length = pos - 1  # all added here was a guess: `observe` feeds the target's states
        return Draft(tokens, np.stack(dists) if dists else None)

    def for_sequence(self) -> MtpDrafter:
        return MtpDrafter(self.model)

    def close(self) -> None:
        pass
