"""numba's cache saves under mertools' lock (kernels/cachelock.py): processes saving at once lose nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from numba.core.caching import IndexDataCacheFile

import mertools.kernels  # noqa: F401 - installs the lock
from mertools.kernels import cachelock

_SAVER = """
import sys, time
from pathlib import Path
from numba.core.caching import IndexDataCacheFile
if sys.argv[4] == "locked":
    from mertools.kernels import cachelock
    cachelock.install()
cache, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = IndexDataCacheFile(cache, "kernel-7.py311", b"stamp")
go = Path(cache) / "go"
while not go.exists():
    time.sleep(0.001)
for i in range(n):
    f.save((who, i), (who, i, b"x" * 3000))
"""


def _race(cache: Path, mode: str, n: int = 150) -> IndexDataCacheFile:
    """Two processes save n signatures each of one kernel into `cache`, started together."""
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(cache), who, str(n), mode]) for who in "ab"]
    time.sleep(1.0)  # both importing numba, then waiting for the start
    (cache / "go").touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    return IndexDataCacheFile(str(cache), "kernel-7.py311", b"stamp")


def test_processes_saving_at_once_keep_every_entry_and_its_own_data(tmp_path: Path) -> None:
    assert IndexDataCacheFile.save is cachelock.locked_save  # what every kernel's cache uses once mertools is imported
    f = _race(tmp_path, "locked")
    index = f._load_index()
    assert sorted(index) == sorted((who, i) for who in "ab" for i in range(150))
    assert len(set(index.values())) == 300  # a data file each
    for key in index:
        assert f.load(key) == (*key, b"x" * 3000)  # each entry names its own data


def test_a_save_in_one_process_is_a_load_in_another(tmp_path: Path) -> None:
    """The lock changes nothing a single process sees: save, overwrite the same key, load back."""
    f = IndexDataCacheFile(str(tmp_path), "kernel-9.py311", b"stamp")
    f.save("sig", (1,))
    f.save("other", (2,))
    f.save("sig", (3,))  # the same key keeps its data name
    assert f.load("sig") == (3,) and f.load("other") == (2,)
    assert sorted(f._load_index().values()) == ["kernel-9.py311.1.nbc", "kernel-9.py311.2.nbc"]
    assert (tmp_path / cachelock.LOCK_NAME).exists()


_VANISHING = """
import sys
sys.path.insert(0, sys.argv[2])
import vanishing_types
from numba.core.caching import IndexDataCacheFile
IndexDataCacheFile(sys.argv[1], "kernel-5.py311", b"stamp").save((vanishing_types.Gone(), "int64"), (1,))
"""


def test_an_index_naming_a_type_that_is_gone_reads_as_empty(tmp_path: Path) -> None:
    """A process saved a signature naming a class of a module this process cannot import (as a cache left by code
    since removed): numba's reader raises at every load; mertools' reads no entries, and the next save rewrites it."""
    mods, cache = tmp_path / "mods", tmp_path / "cache"
    mods.mkdir()
    cache.mkdir()
    (mods / "vanishing_types.py").write_text("class Gone:\n    pass\n")
    subprocess.run([sys.executable, "-c", _VANISHING, str(cache), str(mods)], check=True)
    f = IndexDataCacheFile(str(cache), "kernel-5.py311", b"stamp")
    assert IndexDataCacheFile._load_index is cachelock.tolerant_load_index
    with pytest.raises(ModuleNotFoundError, match="vanishing_types"):
        cachelock._numba_load_index(f)
    assert f._load_index() == {}
    assert f.load(("sig",)) is None
    f.save(("sig",), (2,))
    assert f.load(("sig",)) == (2,)
    assert list(cachelock._numba_load_index(f)) == [("sig",)]  # readable by numba's own reader again
