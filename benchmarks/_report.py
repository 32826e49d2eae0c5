"""Kept for bench_quant.py and bench_matmul.py, which import from here; the helpers live in _common.py."""

from benchmarks._common import machine_description, write_section

__all__ = ["machine_description", "write_section"]
