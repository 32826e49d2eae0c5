"""Interruptions of `mertools convert`: a real SIGKILL or SIGINT at seeded random points of the write
sequence (every tensor write, fsync, rename and unlink of the writer, the commit included), and a full
disk. Nothing left behind ever passes as a layout, and a rerun succeeds. The existing test in
tests/test_convert_errors.py kills a real conversion once, by wall-clock time; this one reaches the
points between the manifest's write and the final rename too, where a kill used to leave
`OUT.partial/` holding a complete manifest and no marker (bug fixed: the marker now goes last)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import LayoutError
from mertools.layout import Layout
from mertools.verify.integrity import check_integrity

ROOT = Path(__file__).resolve().parent.parent

# Runs `mertools convert` in this process after wrapping the writer's I/O steps: at step K it sends
# itself the signal (K = -1: count the steps and print the count).
HOOKED = r"""
import os, pathlib, signal, sys
import mertools.layout.writer as w
K, SIG = int(sys.argv[1]), getattr(signal, sys.argv[2])
n = 0
def step():
    global n
    if n == K:
        os.kill(os.getpid(), SIG)
    n += 1
def hook(owner, name):
    real = getattr(owner, name)
    def wrapped(*a, **k):
        step()
        out = real(*a, **k)
        step()
        return out
    setattr(owner, name, wrapped)
hook(w.AlignedFile, "_write")
hook(w.LayoutWriter, "add_file")
for name in ("replace", "fsync"):
    hook(w.os, name)
hook(pathlib.Path, "unlink")
from mertools.cli import main
try:
    main(sys.argv[3:], standalone_mode=False)
finally:
    if K < 0:
        print("STEPS", n, file=sys.stderr)
"""


def run_hooked(k: int, sig: str, src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", HOOKED, str(k), sig, "convert", str(src), str(out), "--quiet"]
    # a shell that starts the suite in the background hands its children SIGINT ignored; Ctrl-C is what is tested
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def assert_nothing_passes_as_a_layout(out: Path) -> bool:
    """True when OUT is a complete layout (killed after the commit's last step), else nothing opens."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with pytest.raises(LayoutError):
            Layout.open(partial)
    if out.exists():
        try:
            Layout.open(out)
        except LayoutError:
            return False  # refused: fine (e.g. still carrying the partial marker)
        assert check_integrity(out, progress=False).ok, "a directory that opens as a layout must be complete"
        return True
    return False


@pytest.fixture(scope="module")
def steps(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> int:
    work = tmp_path_factory.mktemp("steps")
    res = run_hooked(-1, "SIGKILL", tiny["q4_0"], work / "out")
    assert res.returncode == 0, res.stderr
    return int(res.stderr.split("STEPS")[-1])


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_at_random_points_leaves_no_layout_and_a_rerun_succeeds(tiny: dict, tmp_path: Path, steps: int,
                                                                         sig: str) -> None:
    rng = random.Random(f"interrupt-{sig}")
    # the last steps are the commit (manifest write, fsyncs, renames, marker): always include them
    points = sorted(set(rng.sample(range(steps - 12), 4)) | set(range(steps - 12, steps, 2)))
    for k in points:
        out = tmp_path / f"out-{k}"
        res = run_hooked(k, sig, tiny["q4_0"], out)
        if sig == "SIGKILL":
            assert res.returncode == -signal.SIGKILL, (k, res.returncode, res.stderr[-2000:])
        else:  # Ctrl-C: exit 130, one line, and the writer removed what it had written
            assert res.returncode == 130 and "interrupted" in res.stderr and "Traceback" not in res.stderr, (k, res.stderr)
            assert not out.with_name(out.name + ".partial").exists(), k
        complete = assert_nothing_passes_as_a_layout(out)
        # a rerun cleans up and succeeds (a finished layout is replaced only with --force, as always)
        convert(tiny["q4_0"], out, ConvertOptions(progress=False, force=complete))
        assert check_integrity(out, progress=False).ok
        assert not out.with_name(out.name + ".partial").exists()
        shutil.rmtree(out)


@pytest.fixture()
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 1 MiB tmpfs (needs root and mount, as CI has); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_a_clean_error_and_leaves_nothing(tiny: dict, small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "out"
    res = subprocess.run([sys.executable, "-m", "mertools.cli", "convert", str(tiny["hf"]), str(out), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    # bug fixed: ENOSPC was a traceback and exit status 1
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("mertools: error: "), res.stderr
    assert "No space left on device" in lines[0] and "out.partial/" in lines[0], lines[0]
    assert list(small_disk.iterdir()) == []  # neither OUT nor OUT.partial
    good = convert(tiny["hf"], tmp_path / "roomy", ConvertOptions(progress=False)).out  # where there is room: fine
    assert check_integrity(good, progress=False).ok
