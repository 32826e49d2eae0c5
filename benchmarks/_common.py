"""What the benchmarks share: model shapes, the synthetic checkpoint, child processes (a memory cgroup
for some, llama.cpp for others), the machine's description, dropping the page cache, and writing a
section of docs/BENCHMARKS.md.

Only the standard library at import time: llama.cpp children run in another venv (--llama-python)
that has llama-cpp-python but not necessarily mertools' dependencies.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
CGROUP = Path("/sys/fs/cgroup/memory/mertools-bench")  # cgroup v1 memory controller (needs root)
WORKDIR = "/tmp/mertools-bench"  # the synthetic checkpoint is shared by the benchmarks that use this


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class SynthShape:
    """Dimensions of a synthetic Mixtral-style checkpoint: the keyword arguments of
    fixtures.synth.synth_mixtral_gguf (the layer count aside)."""

    d_model: int = 4096
    d_ff: int = 14336
    n_expert: int = 8
    n_head: int = 32
    n_kv: int = 8
    vocab: int = 32000
    n_expert_used: int = 2

    def kwargs(self) -> dict[str, int]:
        return asdict(self)

    @property
    def expert_matrices(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(rows, cols) of an expert's gate/up and of its down matrix."""
        return (self.d_ff, self.d_model), (self.d_model, self.d_ff)

    def model_config(self, n_layers: int, arch: str = "mixtral") -> Any:  # noqa: ANN401 - mertools' ModelConfig
        from mertools.layout.config import ModelConfig

        return ModelConfig(arch=arch, vocab_size=self.vocab, d_model=self.d_model, d_ff=self.d_ff, n_layers=n_layers,
                           n_heads=self.n_head, n_kv_heads=self.n_kv, head_dim=self.d_model // self.n_head,
                           n_experts=self.n_expert, n_experts_used=self.n_expert_used, context_length=32768)


MIXTRAL = SynthShape()  # Mixtral 8x7B: d_model 4096, d_ff 14336, 8 experts top-2, 32 heads, 8 kv heads
SMALL_MIXTRAL = SynthShape(d_model=512, d_ff=1408, n_expert=8, n_head=8, n_kv=4, vocab=1024)  # serving: compute-light


# mertools' kernel sets as a benchmark's text says them; "int8" is what `mertools run` and `serve` use
KERNELS = {"int8": "the 8-bit-activation kernels (`mertools run`'s default)", "exact": "the exact float kernels"}


def add_kernels_option(ap: Any) -> None:  # noqa: ANN401 - an argparse.ArgumentParser
    ap.add_argument("--kernels", choices=sorted(KERNELS), default="int8", help="mertools' kernels (int8: `mertools run`'s)")


def random_ids(n: int, seed: int, vocab: int = MIXTRAL.vocab, bos: bool = False) -> list[int]:
    """n seeded token ids in 3..vocab (no specials); with `bos`, id 1 first and n - 1 random ones."""
    import numpy as np

    ids = [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n - bos)]
    return [1] + ids if bos else ids


def synth_gguf(workdir: Path, n_layers: int, shape: SynthShape = MIXTRAL, seed: int = 0) -> Path:
    """The synthetic Q4_0 GGUF `workdir/mixtral-{n}L-q4_0.gguf` (built once; every benchmark reuses it).
    Written under another name and renamed, so an interrupted build is never taken for a complete one."""
    from fixtures.synth import synth_mixtral_gguf

    tag = "".join(f"-{k}{v}" for k, v in asdict(shape).items() if v != getattr(MIXTRAL, k))  # "" for Mixtral's
    path = Path(workdir) / f"mixtral-{n_layers}L{tag}-q4_0.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        partial = synth_mixtral_gguf(path.with_name(path.name + ".partial"), n_layers, seed=seed, **shape.kwargs())
        partial.rename(path)
        print(f"synthesised {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return path


# ---------------------------------------------------------------- machine


def machine_description() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        fs = subprocess.run(["df", "-T", str(DOC.parent)], capture_output=True, text=True).stdout.split()[-6]
    except (OSError, IndexError):
        fs = "unknown"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.1f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, filesystem {fs}")


def drop_caches() -> bool:
    """Drop the page cache (needs root); whether it was dropped."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS, MiB. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child
    of a big benchmark process would report its parent's peak (as mertools.runtime.memory does)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat; we are idle meanwhile, so: others)."""
    def sample() -> tuple[int, int]:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 0.1) -> bool:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs for 3 checks
    in a row: the machine is shared, and two busy cores make every parallel region wait for a
    descheduled thread. Returns whether it got quiet."""
    end, calm = time.monotonic() + max_wait, 0
    while time.monotonic() < end:
        calm = calm + 1 if cpu_busy() < threshold else 0
        if calm >= 3:
            return True
    return False


# ---------------------------------------------------------------- report


def publish(name: str, title: str, body: str, write: bool = True) -> None:
    """Print `## title` and `body`, and (with `write`) make them section `name` of docs/BENCHMARKS.md."""
    block = f"## {title}\n\n{body.strip()}"
    print(block)
    if write:
        write_section(name, block)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the block between `<!-- name:start -->` and `<!-- name:end -->` of docs/BENCHMARKS.md.
    Notes outside the markers (history, figures of earlier runs) are left alone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def draw_charts(section: str) -> None:
    """Redraw the charts of `section` from docs/BENCHMARKS.md into docs/img/ (benchmarks/charts.py), right after the
    section is written: the doc is their only source. Without matplotlib (the `plot` extra), a note instead."""
    try:
        from benchmarks import charts
    except ImportError as e:
        print(f"charts of {section!r} not drawn ({e}); with matplotlib installed, "
              f"`python benchmarks/charts.py --section {section}` draws them from the doc", file=sys.stderr)
        return
    for path in charts.draw(DOC, DOC.parent / "img", [section]):
        print(f"chart: {path.relative_to(ROOT)}", file=sys.stderr)


# ---------------------------------------------------------------- child processes


def run_child(script: str | Path, args: Sequence[str], *, python: str = sys.executable, cgroup_bytes: int | None = None,
              timeout: float = 7200) -> dict:
    """Run `python script *args` (one engine per process, so peak RSS and memory are its own) and parse the
    JSON on its last stdout line; {"error": last stderr line} if it failed. With `cgroup_bytes`, the child
    runs in CGROUP capped at that many bytes."""
    cmd = [python, str(script), *args]
    if cgroup_bytes is not None:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(cgroup_bytes))
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs; exec "$@"', "sh", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def timings(fn: Callable[[int], object], repeat: int, warmup: bool = True) -> list[float]:
    """Wall times of fn(0) .. fn(repeat - 1), after one untimed call fn(-1) (numba compile or cache load,
    first touch of the data) unless `warmup` is False."""
    if warmup:
        fn(-1)
    out = []
    for i in range(repeat):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def forced_decode(step: Callable[[list[int]], object], ids: Sequence[int], n_prompt: int,
                  after_prefill: Callable[[], object] | None = None) -> tuple[float, float]:
    """Prefill ids[:n_prompt] in one call, then feed the rest one by one (a forced stream, so every engine
    sees the same tokens); (prefill seconds, decode seconds). `after_prefill` runs between the two, untimed
    (to read counters)."""
    t0 = time.perf_counter()
    step(list(ids[:n_prompt]))
    prefill_s = time.perf_counter() - t0
    if after_prefill is not None:
        after_prefill()
    t1 = time.perf_counter()
    for tok in ids[n_prompt:]:
        step([tok])
    return prefill_s, time.perf_counter() - t1


def open_llama(gguf: str | Path, threads: int, *, repack: bool, n_ctx: int, **kwargs: Any) -> Any:  # noqa: ANN401
    """llama_cpp.Llama on `gguf`, quiet, `threads` for decode and batches. repack False turns off
    `use_extra_bufts` (weights repacked at load into CPU_REPACK buffers), so the file's Q4_0 blocks are
    used as they are, from the mmap when use_mmap is on."""
    import llama_cpp
    import llama_cpp.llama_cpp as low  # Llama() reads the default params through this module

    default = low.llama_model_default_params

    def params():  # noqa: ANN202 - a ctypes struct
        p = default()
        p.use_extra_bufts = repack
        return p

    low.llama_model_default_params = params
    return llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False, **kwargs)


def llama_build(llama_python: str) -> str:
    """What llama.cpp the benchmark ran: llama-cpp-python's version and llama.cpp's own system info line (the
    instruction sets its CPU backend was built with: a native build on a CPU that lists AMX uses AMX kernels, which
    die with SIGILL where the guest cannot use them; build with `-mno-amx-tile -mno-amx-int8 -mno-amx-bf16` there)."""
    code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode().strip())"
    try:
        out = subprocess.run([llama_python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (its Python did not answer)"
    version, _, info = out.strip().partition(" ")
    return f"llama-cpp-python {version}, system info `{' '.join(info.split())}`"


# ---------------------------------------------------------------- mertools serve


def start_server(layout: Path, args: list[str], stderr: IO[str] | int = subprocess.DEVNULL,
                 timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `mertools serve LAYOUT --port P *args` on a free loopback port, once /health
    says ok; killed if it does not come up."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mertools.cli", "serve", str(layout), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not come up: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
