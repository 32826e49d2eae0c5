"""Load the kernels a run will call from numba's on-disk cache on a second thread, while the engine opens.

A process after the first finds every kernel in numba's cache, but loading one (parsing its LLVM bitcode, linking
it) takes 10-400 ms on the thread that first calls it: most of a second for a decode run's kernels, on the main
thread between the open and the first token, where a second run of llama.cpp is already decoding
(docs/BENCHMARKS.md, "A second run right after a first"). `start` loads them in call order on a thread of its own,
on the core the opening thread leaves idle. numba's compiler lock keeps the two threads from loading one kernel twice:
a kernel the main thread calls first it loads itself, as before. Only signatures numba cached for this machine and
these sources are loaded; nothing is compiled here (a first run compiles on the thread that calls, as before). They
are loaded without numba's registry refresh (`load_cached`), which only compiling needs: a run whose kernels all come
from the cache never pays it.

    entry_points(kernels, fused)   the kernels a run of that mode calls from Python, in the order it calls them
    prompt(kernels)                the first step's: the engine's thread walks them too before that step (`load`)
    packing(kernels)               the kernels that pack weights: a thread about to pack loads them first (`load`)
    load(dispatchers, kv_dtype)    their cached signatures loaded on the calling thread
    load_cached(dispatcher, sig)   one cached signature loaded as numba loads a cache hit, minus the refresh and
                                   the parse of its bitcode (done if another kernel is ever compiled to call it)
    start(dispatchers, kv_dtype)   a started thread loading their cached signatures for that KV cache type
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .batch import KV_STORAGE

# arguments by which the kernels that take the KV cache take it: a signature for another KV type is not loaded
KV_ARGS = ("kv_k", "keys")

__all__ = ["cached_signatures", "entry_points", "for_kv", "load", "load_cached", "packing", "prompt", "start"]


def packing(kernels: str) -> list[Any]:
    """The kernels that pack weights for the 8-bit kernels (the dense ones at open, expert slots as they load)."""
    if kernels != "int8":
        return []
    from ..dtypes import _k8packed
    from ..kernels import int8

    return [_k8packed.pack_q6_k, _k8packed.pack_q4_k, int8._pack]


def entry_points(kernels: str, fused: bool) -> list[Any]:
    """numba dispatchers a run calls: with the 8-bit kernels the prompt's products, then the compiled step when
    `fused` (runtime/fused.py), else the attention of one token, then the packing (last: a thread that packs before
    this list reaches them loads them itself, with `load`); the exact kernels' products otherwise. A kernel listed and
    not called costs this thread a load; one called and not listed is loaded by its caller, as without this module."""
    from ..kernels import attention, step
    from ..kernels import matvec_kernels as mv

    if kernels == "int8":
        return prompt(kernels) + ([step.decode_step] if fused else [attention.attend_one]) + packing(kernels)
    return prompt(kernels) + [attention.attend_one, mv.matvec_swiglu]


def prompt(kernels: str) -> list[Any]:
    """The first of `entry_points`: the kernels of a run's first step (a prompt), which the engine's thread also walks
    before that step (`load`): where it gets ahead of the preload thread, it loads them as that thread does."""
    from ..kernels import experts8, int8, rowops
    from ..kernels import matmul_kernels as mm
    from ..kernels import matvec_kernels as mv

    if kernels == "int8":
        return [mm.get_rows, int8._quantized_matmul8, rowops._dense_rows, rowops._softmax_rows,
                int8._quantized_swiglu8, experts8.experts8]
    return [mm.get_rows, mm.matmul_tiled, mv.matvec]


def cached_signatures(dispatcher: Any) -> list[tuple]:  # noqa: ANN401 - a numba Dispatcher
    """The argument types numba's disk cache holds `dispatcher` compiled for on this machine from its current source
    (numba's own index, read as its loader reads it); [] for a kernel without a cache, or a numba whose cache is laid
    out otherwise (the loads then happen at the first calls, as without preloading)."""
    cache = getattr(dispatcher, "_cache", None)
    index_file = getattr(cache, "_cache_file", None)
    if index_file is None or not hasattr(cache, "_index_key"):
        return []
    try:
        codegen = dispatcher.targetctx.codegen()
        return [key[0] for key in index_file._load_index() if cache._index_key(key[0], codegen) == key]
    except (AttributeError, TypeError, ValueError, OSError, EOFError):  # another numba's index, a torn file
        return []


def for_kv(dispatcher: Any, sig: tuple, kv_dtype: str) -> bool:  # noqa: ANN401
    """Whether `sig` takes the KV cache (the arguments named in KV_ARGS) in `kv_dtype`'s arrays, or takes none."""
    names = list(inspect.signature(dispatcher.py_func).parameters)
    want = np.dtype(KV_STORAGE[kv_dtype])
    return all(np.dtype(str(sig[names.index(a)].dtype)) == want for a in KV_ARGS if a in names)


def load_cached(dispatcher: Any, sig: tuple) -> bool:  # noqa: ANN401 - a numba Dispatcher
    """Load `dispatcher`'s cached `sig` as `Dispatcher.compile` loads a cache hit, but without numba's registry refresh
    (its cache loader's first step: importing and installing every lowering and typing registry, 0.25-0.3 s of Python
    here, which only compiling needs; numba's compiler refreshes before it compiles). The runtime the cached code links
    to is initialised as the refresh would. False when the cache did not hold it."""
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.runtime import rtsys

    with global_compiler_lock:  # as `compile`: the main thread may be loading or compiling the same kernel
        if tuple(sig) in dispatcher.overloads:
            return True
        ctx = dispatcher.targetctx
        rtsys.initialize(ctx)
        with _bitcode_when_linked(ctx.codegen()):
            cres = dispatcher._cache._load_overload(sig, ctx)
        if cres is None:
            return False
        dispatcher._cache_hits[sig] += 1
        if not cres.objectmode:
            ctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
        dispatcher.add_overload(cres)
        return True


def load(dispatchers: list[Any], kv_dtype: str) -> None:  # noqa: ANN401
    """Each dispatcher's cached signatures for a KV cache of `kv_dtype` loaded on the calling thread (`load_cached`),
    in order; the first failure ends it quietly (the caller meets it again at its call, and reports it there)."""
    for d in dispatchers:
        for sig in cached_signatures(d):
            if for_kv(d, sig, kv_dtype):
                try:
                    if not load_cached(d, sig):
                        d.compile(sig)  # numba's own path (it would have found nothing either: it compiles)
                except Exception:  # noqa: BLE001 - the caller meets the same failure at its call, and reports it there
                    return


def start(dispatchers: list[Any], kv_dtype: str) -> threading.Thread:  # noqa: ANN401
    """A started thread loading each dispatcher's cached signatures for a KV cache of `kv_dtype`, in order. Not a
    daemon: an interpreter exiting waits for it rather than tearing numba down under a load."""
    t = threading.Thread(target=load, args=(list(dispatchers), kv_dtype), name="mertools-preload")
    t.start()
    return t


# A cached kernel holds its machine code and its LLVM bitcode, kept for linking it into a kernel compiled later that
# calls it. numba parses that bitcode at each load and walks its symbols in Python: ~60% of a load's time here (0.3 s
# of a decode run's 0.45-0.55 s). Loads through `load_cached` take the defined symbols from the machine code's ELF
# symbol table and parse the bitcode only if a compile ever links the kernel in.


@functools.cache
def _lazy_library(base: type) -> type:
    """A subclass of numba's code library class `base` whose `_bitcode`, if set, is parsed when first linked."""

    class LazyBitcodeLibrary(base):  # type: ignore[valid-type,misc]
        _bitcode: bytes | None = None

        def _get_module_for_linking(self):  # noqa: ANN202 - an llvmlite ModuleRef
            if self._shared_module is None and self._bitcode is not None:
                import llvmlite.binding as ll

                self._shared_module = ll.parse_bitcode(self._bitcode)
                self._codegen._engine._load_defined_symbols(self._shared_module)
                self._bitcode = None
            return super()._get_module_for_linking()

    return LazyBitcodeLibrary


def elf_defined_symbols(obj: bytes) -> set[str]:
    """The names an ELF64 little-endian object defines (every symbol table entry with a section and a name)."""
    if obj[:6] != b"\x7fELF\x02\x01":
        raise ValueError(f"not an ELF64 little-endian object: {obj[:6]!r}")
    shoff, (shentsize, shnum) = int.from_bytes(obj[0x28:0x30], "little"), np.frombuffer(obj, "<u2", 2, 0x3A)
    sections = np.frombuffer(obj, _SECTION, int(shnum), shoff) if shentsize == _SECTION.itemsize else None
    if sections is None:
        raise ValueError(f"ELF section headers of {shentsize} bytes, not {_SECTION.itemsize}")
    names: set[str] = set()
    for sec in sections[sections["type"] == 2]:  # SHT_SYMTAB; its strings in the section sh_link names
        syms = np.frombuffer(obj, _SYMBOL, int(sec["size"]) // _SYMBOL.itemsize, int(sec["offset"]))
        strings = int(sections[sec["link"]]["offset"])
        for at in syms["name"][(syms["shndx"] != 0) & (syms["name"] != 0)]:
            start = strings + int(at)
            names.add(obj[start:obj.index(b"\0", start)].decode())
    return names


_SECTION = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
                     ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("align", "<u8"), ("entsize", "<u8")])
_SYMBOL = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
                    ("size", "<u8")])


@contextmanager
def _bitcode_when_linked(codegen: Any) -> Iterator[None]:  # noqa: ANN401 - numba's JIT codegen
    """While numba loads a cache entry (under its compiler lock), `codegen` unserialises machine-code libraries
    without parsing their bitcode (`_lazy_library`); anything else, or an object not ELF, as numba does."""
    own = codegen.unserialize_library

    def unserialize(state: tuple) -> Any:  # noqa: ANN401 - numba's CodeLibrary
        name, kind, data = state
        try:
            symbols = elf_defined_symbols(data[0]) if kind == "object" else None
        except (ValueError, IndexError, UnicodeDecodeError):
            symbols = None
        if symbols is None:
            return own(state)
        library = _lazy_library(codegen._library_class)(codegen, name)
        library.enable_object_caching()
        library._set_compiled_object(data[0])
        library._bitcode = data[1]
        library._finalize_final_module()
        codegen._engine._defined_symbols |= symbols
        return library

    codegen.unserialize_library = unserialize  # this codegen's loads under the lock are this thread's alone
    try:
        yield
    finally:
        del codegen.unserialize_library
