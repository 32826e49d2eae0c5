"""numba's on-disk cache made safe for processes that compile at the same time.

numba (0.68, `numba/core/caching.py`) saves a compiled signature by reading the kernel's index, taking the first
data file name the index does not list and rewriting the index, with no lock: two processes compiling different
signatures of one kernel at once can both take `.1.nbc`, and one index entry then names the other's machine code
(seen as last-bit differences when the suite ran on two pytest-xdist workers; with a serve and a run starting
together it could load a kernel compiled for other argument types). `install()` replaces that save with one made
under an exclusive `flock` on a lock file in the cache directory: the index is read inside the lock, the data
written before the index names it, so an index only ever names complete data of its own key. Loads take no lock:
a data name, once given to a key, is never given to another while the source is unchanged.

An index is a pickle of its signatures' types: one naming a class that can no longer be imported (a cache left by
another mertools or numba, or by code since removed) made numba's reader raise at every load of that kernel, so the
kernel could never run. `install()` also has such an index read as empty, as numba reads an index of another
version: the kernel is compiled again and the index rewritten without the entries nothing can read.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import pickle

from numba.core import caching

LOCK_NAME = "mertools-cache.lock"  # one per cache directory: saves are rare (a compile each), contention nil
_numba_save = caching.IndexDataCacheFile.save
_numba_load_index = caching.IndexDataCacheFile._load_index
# what unpickling an index whose types are gone or whose bytes are torn raises
_UNREADABLE = (pickle.UnpicklingError, ImportError, AttributeError, EOFError, TypeError, ValueError, IndexError)


def tolerant_load_index(self: caching.IndexDataCacheFile) -> dict:
    """numba's `_load_index`, an index that cannot be unpickled read as empty (see the module's docstring)."""
    try:
        return _numba_load_index(self)
    except _UNREADABLE:
        return {}


def locked_save(self: caching.IndexDataCacheFile, key: object, data: object) -> None:
    """`IndexDataCacheFile.save` under the directory's lock (numba's own save where no lock can be taken: a
    read-only or lock-less filesystem, where numba then fails or races as it always did)."""
    try:
        fd = os.open(os.path.join(self._cache_path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return _numba_save(self, key, data)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            return _numba_save(self, key, data)
        overloads = self._load_index()
        name = overloads.get(key)
        new = name is None
        if new:
            taken = set(overloads.values())
            name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
        self._save_data(name, data)  # written (temp file, then rename) before the index names it
        if new:
            overloads[key] = name
            self._save_index(overloads)
    finally:
        os.close(fd)  # releases the lock


def install() -> None:
    """Make every numba cache save in this process take the lock, and every index read survive types that are gone
    (idempotent)."""
    caching.IndexDataCacheFile.save = locked_save
    caching.IndexDataCacheFile._load_index = tolerant_load_index
