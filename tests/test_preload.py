"""runtime/preload.py: the kernels a run calls, loaded from numba's cache on a thread of their own while the engine
opens. Checked in fresh processes (a process that has run other tests holds other kernels): a run without preloading
loads from the cache only kernels the list names, a run with it finds every one of them loaded once the thread ends,
compiles nothing, and computes the same logits bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import types

from mertools.kernels import attention, step
from mertools.runtime import preload
from mertools.runtime.engine import KERNEL_MODES

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import numpy as np
import numba
from mertools.runtime import preload
from mertools.runtime.compile_clock import compile_seconds
layout, mode, out = sys.argv[1:4]
if mode == "off":  # as before the module: each kernel loaded by its first caller
    preload.entry_points = preload.prompt = lambda *a, **k: []
if mode == "behind":  # a preload thread that has not reached the prompt's kernels by the first step: it loads them
    points, first = preload.entry_points, preload.prompt("int8")
    preload.entry_points = lambda *a, **k: [d for d in points(*a, **k) if d not in first]
from mertools.runtime.engine import Engine

def kernels():
    seen = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("mertools."):
            for v in vars(mod).values():
                if isinstance(v, numba.core.registry.CPUDispatcher):
                    seen[id(v)] = v
    return seen.values()

def name(d):
    return f"{d.py_func.__module__}.{d.py_func.__name__}"

eng = Engine.open(layout, kernels="int8", context=32, io="buffered")
ready = []
if eng.loading is not None and mode == "on":
    eng.loading.join()
    ready = sorted(name(d) for d in kernels() if d.overloads)
logits = [eng.forward([1, 2, 3, 4, 5]), eng.forward([6]), eng.forward([7])]
np.save(out, np.concatenate(logits))
print(json.dumps({"fused": eng.model.fused is not None, "ready": ready, "compiled": compile_seconds(),
                  # numba's registry refresh imports its lowering modules: a run of cached kernels needs none of them
                  "refreshed": "numba.np.npyimpl" in sys.modules,
                  "loaded": sorted(name(d) for d in kernels() if sum(d._cache_hits.values()))}))
eng.close()
"""


def _run(layout: Path, mode: str, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(layout), mode, str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _name(d: object) -> str:
    return f"{d.py_func.__module__}.{d.py_func.__name__}"


@pytest.mark.parametrize("kernels", KERNEL_MODES)
@pytest.mark.parametrize("fused", [True, False])
def test_every_entry_point_is_a_numba_kernel_numba_caches(kernels: str, fused: bool) -> None:
    points = preload.entry_points(kernels, fused)
    assert points and len({id(d) for d in points}) == len(points)
    for d in points:
        assert d._cache._cache_file is not None, _name(d)  # cache=True: else nothing is ever there to load


def test_a_signature_for_another_kv_type_is_not_loaded() -> None:
    for kernel, arg in ((step.decode_step, "kv_k"), (attention.attend_one, "keys")):
        params = list(kernel.py_func.__code__.co_varnames[:kernel.py_func.__code__.co_argcount])
        for kv_dtype, dtype in (("f16", types.uint16), ("f32", types.float32), ("q8_0", types.uint8)):
            sig = [types.int64] * len(params)
            sig[params.index(arg)] = types.Array(dtype, 3, "C")
            assert preload.for_kv(kernel, tuple(sig), kv_dtype)
            assert not preload.for_kv(kernel, tuple(sig), "f32" if kv_dtype != "f32" else "f16")
    assert preload.for_kv(preload.entry_points("int8", True)[0], (types.int64,), "f32")  # takes no KV cache


def test_the_preloaded_kernels_are_the_runs_and_compute_the_same(tiny_q4_0: Path, tmp_path: Path) -> None:
    _run(tiny_q4_0, "off", tmp_path / "warm.npy")  # compiles what the disk cache lacks
    off = _run(tiny_q4_0, "off", tmp_path / "off.npy")
    on = _run(tiny_q4_0, "on", tmp_path / "on.npy")
    assert off["fused"] and on["fused"]
    listed = {_name(d) for d in preload.entry_points("int8", True)}
    # every kernel the run loaded from the cache itself is one the list names (else its load stays on the main thread)
    assert off["loaded"] and set(off["loaded"]) <= listed, set(off["loaded"]) - listed
    # with preloading, each of them was loaded before the first step, and nothing was compiled on the main thread
    assert set(off["loaded"]) <= set(on["ready"]), set(off["loaded"]) - set(on["ready"])
    assert on["compiled"] == 0 and off["compiled"] == 0
    assert off["refreshed"] and not on["refreshed"]  # the loads skipped the refresh numba's own loader does
    behind = _run(tiny_q4_0, "behind", tmp_path / "behind.npy")
    assert not behind["refreshed"] and behind["compiled"] == 0
    a, b = np.load(tmp_path / "off.npy"), np.load(tmp_path / "on.npy")
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert np.array_equal(a.view(np.uint32), np.load(tmp_path / "behind.npy").view(np.uint32))


LAZY = r"""
import numpy as np
from numba import njit
from mertools.kernels.rowops import _softmax_rows, softmax_rows
from mertools.runtime import preload
preload.load([_softmax_rows], "f16")
lib = next(iter(_softmax_rows.overloads.values())).library
assert type(lib).__name__ == "LazyBitcodeLibrary" and lib._shared_module is None  # its bitcode not parsed
x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
loaded = softmax_rows(x)

@njit(cache=False)
def twice(x2, out):  # a new kernel calling the loaded one: numba links the loaded one's bitcode into it
    _softmax_rows(x2, out)
    _softmax_rows(out, out)

out = np.empty_like(x)
twice(x, out)
assert lib._shared_module is not None  # parsed when linked
print(json.dumps({"loaded": loaded.tolist(), "twice": out.tolist()}))
"""


def test_a_kernel_loaded_without_its_bitcode_runs_and_links_into_a_new_one() -> None:
    """`load_cached` takes a kernel's defined symbols from its machine code and leaves its bitcode unparsed until a
    compile links it into another kernel: in a fresh process the loaded kernel computes what this process's does, and a
    kernel compiled afterwards that calls it links and computes softmax twice."""
    from mertools.kernels.rowops import softmax_rows

    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    want = softmax_rows(x)  # compiled (and cached) here if the cache lacked it
    p = subprocess.run([sys.executable, "-c", "import json\n" + LAZY], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert np.array_equal(np.asarray(got["loaded"], np.float32), want)
    assert np.array_equal(np.asarray(got["twice"], np.float32), softmax_rows(want))


def test_elf_defined_symbols_are_the_bitcodes_external_definitions() -> None:
    """The names read from a cached kernel's ELF object include every function and variable its bitcode defines with
    a name the object keeps (all but LLVM's private constants), and a non-ELF buffer is refused."""
    import llvmlite.binding as ll

    from mertools.kernels.rowops import _softmax_rows, softmax_rows

    softmax_rows(np.ones((1, 4), np.float32))  # compiled or loaded: then cached
    sig = preload.cached_signatures(_softmax_rows)[0]
    cache = _softmax_rows._cache
    name, kind, (obj, bitcode) = cache._cache_file.load(cache._index_key(sig, _softmax_rows.targetctx.codegen()))[0]
    assert kind == "object"
    mod = ll.parse_bitcode(bitcode)
    defined = {g.name for g in [*mod.functions, *mod.global_variables] if not g.is_declaration
               and g.linkage != ll.Linkage.private}
    names = preload.elf_defined_symbols(obj)
    assert defined and defined <= names
    with pytest.raises(ValueError, match="not an ELF64"):
        preload.elf_defined_symbols(bitcode)


def test_the_run_commands_imports_leave_out_conversion_and_http() -> None:
    """A `mertools run` imports the CLI and the engine: not the conversion pipeline and its source readers (the
    convert command's choices come from the presets' table), nor `top`'s HTTP client; ~25 ms of a second run's
    start."""
    code = ("import sys; import mertools.cli; from mertools.runtime import compile_clock, engine, report\n"
            "print(sorted(m for m in ('mertools.convert.pipeline', 'mertools.convert.source', 'urllib.request', 'ssl',"
            " 'zstandard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
