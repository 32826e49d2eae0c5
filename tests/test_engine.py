"""The runtime against independent references, on real layouts read with O_DIRECT."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mertools.errors import ChecksumError, ExpertReadError, LayoutError
from mertools.layout import Layout
from mertools.reference.forward import ReferenceModel
from mertools.runtime.engine import Engine, RuntimeConfigError

PROMPT = [1, 45, 300, 22, 17, 99, 250, 3, 7, 400, 12, 88, 5, 260, 31, 77]


@pytest.fixture(scope="module")
def layouts(tiny_dtypes: dict[str, Path]) -> dict[str, Path]:
    return tiny_dtypes


def _slot_mb(layout: Path) -> float:
    return max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20


def run_logits(layout: Path, ids: list[int], chunks: tuple[int, ...] = (), **kw) -> tuple[np.ndarray, dict]:
    with Engine.open(layout, **{"kv_dtype": "f32", **kw}) as eng:  # an exact KV cache: these compare weights
        parts, start = [], 0
        for end in (*chunks, len(ids)):
            parts.append(eng.forward(ids[start:end]))
            start = end
        return np.concatenate(parts), eng.stats()


def test_f16_layout_matches_the_numpy_reference_of_the_source(layouts: dict, tiny: dict) -> None:
    ref = ReferenceModel.from_source(tiny["hf"]).forward(PROMPT)
    got, stats = run_logits(layouts["f16"], PROMPT)
    assert got.shape == (len(PROMPT), 512) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert stats["o_direct"] is True and stats["bytes_read"] > 0


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_k"])
def test_quantized_layouts_match_the_reference_on_dequantized_weights(layouts: dict, dtype: str) -> None:
    ref = ReferenceModel.from_layout(layouts[dtype]).forward(PROMPT)
    got, _ = run_logits(layouts[dtype], PROMPT)
    assert np.abs(got - ref).max() < 2e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_prefill_in_chunks_equals_one_prefill(layouts: dict) -> None:
    whole, _ = run_logits(layouts["q4_0"], PROMPT)
    parts, _ = run_logits(layouts["q4_0"], PROMPT, chunks=(3, 4, 11))
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f16", "q4_k"])
def test_cache_size_and_prefetch_never_change_results(layouts: dict, dtype: str) -> None:
    layout = layouts[dtype]
    slot = _slot_mb(layout)
    base, stats = run_logits(layout, PROMPT, chunks=(8, 9, 10), cache_mb=100 * slot, prefetch="none")
    assert stats["cache_slots"] == 8  # everything fits
    for slots in (2, 3, 5, 8):  # 2 = one layer's active experts
        for mode in ("lookahead", "markov", "none"):
            got, st = run_logits(layout, PROMPT, chunks=(8, 9, 10), cache_mb=slots * slot, prefetch=mode)
            assert st["cache_slots"] == slots
            np.testing.assert_array_equal(got, base, err_msg=f"{slots} slots, prefetch {mode}")
    _, small = run_logits(layout, PROMPT, chunks=(8, 9, 10), cache_mb=2 * slot)
    assert small["expert_misses"] > stats["expert_misses"]  # the small cache really streamed


def test_lookahead_prefetch_is_used(layouts: dict) -> None:
    ids = PROMPT[:4]
    with Engine.open(layouts["q4_0"], cache_mb=5 * _slot_mb(layouts["q4_0"]), prefetch="lookahead") as eng:
        eng.forward(ids)
        for t in range(12):
            eng.forward([int(eng.forward([ids[-1] if t == 0 else 7], all_logits=False).argmax())])
        s = eng.stats()
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0


def _refuses_o_direct(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return False
    except OSError as e:
        return e.errno == errno.EINVAL
    finally:
        probe.unlink()


@pytest.fixture()
def no_direct_dir(tmp_path: Path):  # noqa: ANN201
    """A directory on a real filesystem that refuses O_DIRECT: tmpfs on older kernels; since Linux
    6.6 tmpfs accepts it, so then a ramfs mounted for the test (needs root, as on CI here)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and _refuses_o_direct(shm):
        d = shm / f"mertools-test-{os.getpid()}"
        d.mkdir()
        yield d
        shutil.rmtree(d)
        return
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "none", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("no filesystem refusing O_DIRECT is available (tmpfs accepts it; cannot mount ramfs)")
    try:
        if not _refuses_o_direct(mnt):
            pytest.skip("ramfs accepted O_DIRECT")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_reads_use_o_direct_where_supported(layouts: dict) -> None:
    if _refuses_o_direct(layouts["q4_0"]):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    with Engine.open(layouts["q4_0"], cache_mb=2 * _slot_mb(layouts["q4_0"])) as eng:
        eng.forward(PROMPT[:3])
        rel = eng.layout.manifest.expert(0, 0).file
        assert eng.store.o_direct is True
        assert eng.store.fd_flags(rel) & os.O_DIRECT


def test_falls_back_to_buffered_reads_where_o_direct_is_refused(layouts: dict, no_direct_dir: Path) -> None:
    dst = Path(shutil.copytree(layouts["q4_0"], no_direct_dir / "lay"))
    notices: list[str] = []
    with Engine.open(dst, cache_mb=2 * _slot_mb(dst), kv_dtype="f32") as eng:
        eng.store.notice = notices.append
        got = eng.forward(PROMPT)
        rel = eng.layout.manifest.expert(0, 0).file
        assert eng.store.o_direct is False
        assert not eng.store.fd_flags(rel) & os.O_DIRECT
        assert eng.stats()["o_direct"] is False
    want, _ = run_logits(layouts["q4_0"], PROMPT, cache_mb=2 * _slot_mb(layouts["q4_0"]))
    np.testing.assert_array_equal(got, want)
    assert len(notices) == 1 and "O_DIRECT" in notices[0]  # said once, not per read


# ---------------------------------------------------------------- faults


def _copy(layout: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layout, tmp_path / "lay"))


def test_truncated_expert_file_is_refused_at_open(layouts: dict, tmp_path: Path) -> None:
    lay = _copy(layouts["q4_0"], tmp_path)
    e = Layout.open(lay).manifest.expert(1, 2)
    os.truncate(lay / e.file, e.nbytes - 4096)
    with pytest.raises(LayoutError, match="expert_002.bin"):
        Engine.open(lay)


def test_expert_changed_while_running_is_an_error_naming_it(layouts: dict, tmp_path: Path) -> None:
    lay = _copy(layouts["q4_0"], tmp_path)
    with Engine.open(lay, cache_mb=2 * _slot_mb(lay), prefetch="none") as eng:
        eng.forward(PROMPT[:2])
        for e in range(4):  # corrupt every expert of layer 1 (same size, other bytes)
            path = lay / eng.layout.manifest.expert(1, e).file
            data = bytearray(path.read_bytes())
            data[100] ^= 0xFF
            path.write_bytes(bytes(data))
        eng.reset()
        with pytest.raises(ChecksumError, match=r"layer 1 expert \d.*xxh3"):
            eng.forward(PROMPT)


def test_read_errors_are_retried_then_reported_with_the_file(layouts: dict) -> None:
    calls = {"n": 0}

    def flaky(fd: int, view: memoryview, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            raise OSError(errno.EIO, "Input/output error")
        return os.preadv(fd, [view], offset)

    want, _ = run_logits(layouts["q4_0"], PROMPT[:4], prefetch="none")
    with Engine.open(layouts["q4_0"], prefetch="none", kv_dtype="f32") as eng:
        eng.store.read_fn = flaky  # every other read fails once: retries hide it
        np.testing.assert_array_equal(eng.forward(PROMPT[:4]), want)
        assert eng.stats()["read_retries"] > 0

    def broken(fd: int, view: memoryview, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with Engine.open(layouts["q4_0"], prefetch="none") as eng:
        eng.store.read_fn = broken
        with pytest.raises(ExpertReadError, match=r"expert_00\d\.bin: layer 0 expert \d: read failed after 4 attempts"):
            eng.forward(PROMPT[:4])

    def short(fd: int, view: memoryview, offset: int) -> int:
        return 0

    with Engine.open(layouts["q4_0"], prefetch="none") as eng:
        eng.store.read_fn = short
        with pytest.raises(ExpertReadError, match="short read"):
            eng.forward(PROMPT[:4])


def test_bad_runtime_options(layouts: dict) -> None:
    slot = _slot_mb(layouts["q4_0"])
    with pytest.raises(RuntimeConfigError, match="smaller than one layer's active experts"):
        Engine.open(layouts["q4_0"], cache_mb=1.5 * slot)
    with pytest.raises(RuntimeConfigError, match="prefetch"):
        Engine.open(layouts["q4_0"], prefetch="psychic")
    with Engine.open(layouts["q4_0"]) as eng:
        with pytest.raises(RuntimeConfigError, match="exceed the model's context of 512"):
            eng.forward([1] * 513)
        with pytest.raises(RuntimeConfigError, match="out of range"):
            eng.forward([512])


def test_opening_an_engine_leaves_numpy_one_blas_thread(layouts: dict) -> None:
    """BLAS threads would fight the kernels' spinning numba threads (engine.one_blas_thread)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy has no BLAS library that threadpoolctl knows")
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        with Engine.open(layouts["q4_0"]):
            assert blas_threads() == {1}


def test_matches_hf_transformers(layouts: dict, tiny: dict) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(tiny["hf"], torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0].numpy()
    got, _ = run_logits(layouts["f16"], PROMPT, cache_mb=2 * _slot_mb(layouts["f16"]))
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(1) == want.argmax(1)).all()


def test_batched_steps_equal_solo_runs_bit_for_bit_and_read_less(layouts: dict) -> None:
    layout = layouts["q4_k"]
    prompts = [[1, 5, 9, 33, 40], [1, 7], [1, 300, 22, 17, 99, 250, 3]]
    slot = _slot_mb(layout)

    def solo(ids: list[int]) -> tuple[list[np.ndarray], int]:
        with Engine.open(layout, cache_mb=2 * slot, prefetch="none") as eng:
            seq = eng.new_sequence()
            outs = [eng.step([(seq, ids)])[0]]
            for _ in range(6):
                outs.append(eng.step([(seq, [int(outs[-1].argmax())])])[0])
            return outs, eng.stats()["bytes_read"]

    want = [solo(p) for p in prompts]
    with Engine.open(layout, cache_mb=2 * slot, prefetch="none") as eng:
        seqs = [eng.new_sequence() for _ in prompts]
        outs = [[o] for o in eng.step(list(zip(seqs, prompts, strict=True)))]
        for _ in range(6):
            step = eng.step([(s, [int(o[-1].argmax())]) for s, o in zip(seqs, outs, strict=True)])
            for o, new in zip(outs, step, strict=True):
                o.append(new)
        batched_bytes = eng.stats()["bytes_read"]
    for (w, _), got in zip(want, outs, strict=True):
        for a, b in zip(w, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert batched_bytes < sum(b for _, b in want)


def test_store_calls_off_a_chunked_load_and_counts_only_bytes_read(layouts: dict) -> None:
    import threading

    from mertools.runtime.cache import LoadCancelled
    from mertools.runtime.store import ExpertStore

    lay = Layout.open(layouts["f16"])
    nbytes = lay.manifest.expert(0, 1).nbytes
    assert nbytes > 8 * 4096  # several chunks of 4 KiB
    store = ExpertStore(lay, 1, io_depth=1, chunk_bytes=4096)
    try:
        cancel = threading.Event()
        reads = []

        def counting(fd: int, view: memoryview, offset: int) -> int:
            reads.append(offset)
            if len(reads) == 2:
                cancel.set()  # the routing proved the guess wrong after two chunks
            return os.preadv(fd, [view], offset)

        store.read_fn = counting
        with pytest.raises(LoadCancelled):
            store.load((0, 1), 0, cancel)
        assert store.bytes_read == 2 * 4096 and len(reads) == 2
        store.load((0, 1), 0)  # not cancelled: whole, checksum verified
        assert store.bytes_read == 2 * 4096 + nbytes
    finally:
        store.close()


def test_f16_kv_cache_is_within_verify_f16_limits(layouts: dict) -> None:
    from family_checks import assert_f16_kv_within_f16_limits

    assert_f16_kv_within_f16_limits(layouts["f16"], PROMPT + PROMPT[::-1])
