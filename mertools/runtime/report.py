"""Human-readable summary of an engine's figures."""

from __future__ import annotations

from typing import Any


def format_stats(s: dict[str, Any]) -> str:
    lat = s["read_latency_ms"]
    ttft = f"{s['ttft_s'] * 1e3:.0f} ms" if s["ttft_s"] is not None else "-"
    return "\n".join([
        "--",
        *([f"warm-up     {s['warmup_s']:.2f} s of numba compiling its kernels (a machine's first run; loaded from its "
           "cache after) or running them ahead, left out of the figures below"] if s.get("warmup_s") else []),
        f"prompt      {s['prompt_tokens']} tokens, prefill {s['prefill_tok_s']:.2f} tok/s, time to first token {ttft}",
        f"generated   {s['generated_tokens']} tokens, decode {s['decode_tok_s']:.2f} tok/s"
        + (f" (finish: {s['finish_reason']})" if s.get("finish_reason") else ""),
        f"experts     {s['expert_lookups']} lookups, {s['expert_hits']} hits, {s['expert_misses']} misses, "
        f"hit rate {s['hit_rate']:.1%}; cache {s['cache_slots']} slots = {s['cache_mb']:.1f} MiB",
        f"reads       {s['bytes_read'] / 2**20:.1f} MiB at {s['read_mb_s']:.0f} MB/s per read, latency p50/p95/p99 "
        f"{lat[50]:.2f}/{lat[95]:.2f}/{lat[99]:.2f} ms, "
        f"{'mapped (mmap)' if s.get('mapped') else 'O_DIRECT ' + ('yes' if s['o_direct'] else 'no')}"
        f"{' (pages kept for the next run)' if s.get('keep_pages') else ''}, "
        f"retries {s['read_retries']}"
        + (f"; {s['experts_filled']} experts read by the background fill" if s.get("experts_filled") else "")
        + (f"; packed copies {s['packed_copies_mapped']} mapped, {s['packed_copies_written']} written"
           if s.get("packed_copies_mapped") or s.get("packed_copies_written") else ""),
        f"waiting     {s['read_wait_share']:.1%} of compute time spent waiting on reads; kernels {s.get('kernels', 'exact')}"
        + (f", {s['compiled_steps']} steps in one compiled call" if s.get("compiled_steps") else ""),
        f"prefetch    {s['prefetch']}"
        + (f" (depth {s['prefetch_depth']})" if s["prefetch"] == "lookahead" and s.get("prefetch_depth", 1) > 1 else "")
        + f": {s['prefetch_issued']} issued"
        + (f" ({s['prefetch_ahead']} beyond the next layer)" if s.get("prefetch_ahead") else "")
        + f", {s['prefetch_used']} used, "
        f"{s['prefetch_wasted']} wasted, {s['prefetch_cancelled']} called off while loading",
        *_approx_lines(s),
        *([f"speculate   {s['spec_steps']} verification steps: {s['draft_proposed']} tokens drafted, "
           f"{s['draft_accepted']} accepted ({s['draft_acceptance']:.1%}), {s['tokens_per_step']:.2f} tokens per step, "
           f"{s['bytes_read'] / max(1, s['generated_tokens']) / 2**20:.1f} MiB of experts read per generated token"]
          if s.get("spec_steps") else []),
        *([f"history     {s['history_preloaded']} experts loaded at open from the routing history "
           f"({s['history_tokens']:.0f} tokens behind it)"] if s.get("history_tokens") else []),
        f"memory      peak RSS {s['peak_rss_mb']:.0f} MiB",
        f"KV cache    {s['kv_dtype']}, {s['kv_bytes_per_token'] / 1024:.1f} KiB per token of context, "
        f"{s['kv_mb']:.1f} MiB held",
    ])


def _approx_lines(s: dict[str, Any]) -> list[str]:
    """Approximate routing's line, when it is on."""
    if s.get("approx", "exact") == "exact":
        return []
    return [f"approx      {s['approx']}: of {s['expert_choices_per_token']} expert choices per token, "
            f"{s['approx_dropped_per_token']:.2f} skipped, {s['approx_substituted_per_token']:.2f} replaced by "
            f"resident experts and {s.get('approx_standins_per_token', 0.0):.2f} computed with stand-ins "
            f"({s['approx_dropped']}, {s['approx_substituted']} and {s.get('approx_standins', 0)} in all; stand-ins read "
            f"{s.get('standin_bytes_read', 0) / 2**20:.1f} MiB)"]
