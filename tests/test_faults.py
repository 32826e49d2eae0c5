"""Hostile layouts refused before any read, and faults while running: expert files deleted, truncated or
failing with EIO under a live Engine and a live server. Builds on tests/test_layout.py (hostile
manifests), tests/test_engine.py (checksum change, EIO/short reads through the store's read seam) and
tests/test_verify.py; what is here is what those do not cover."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fixtures.fuzz import time_limit
from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import ExpertReadError, LayoutError
from mertools.layout import Layout
from mertools.layout.writer import PARTIAL_MARKER
from mertools.runtime.engine import Engine
from mertools.server.app import ServerConfig, create_app

PROMPT = [1, 45, 300, 22, 17, 99, 250, 3]


@pytest.fixture(scope="module")
def base(tiny_q4_0: Path) -> Path:
    return tiny_q4_0


@pytest.fixture()
def lay(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "tiny-q4"))


def slot_mb(layout: Path) -> float:
    return max(e.nbytes for e in Layout.open(layout).manifest.experts) / 2**20


def open_refused(layout: Path, match: str) -> None:
    with time_limit(10), pytest.raises(LayoutError, match=match):  # a FIFO read would block: fail, not hang
        Layout.open(layout)


# ---------------------------------------------------------------- hostile layouts, refused before any read
def test_manifest_that_is_a_fifo_or_an_endless_device_is_refused(lay: Path) -> None:
    (lay / "manifest.json").unlink()
    os.mkfifo(lay / "manifest.json")  # reading it would block forever (bug fixed: it did)
    open_refused(lay, "not a regular file")
    (lay / "manifest.json").unlink()
    os.symlink("/dev/zero", lay / "manifest.json")  # reading it would never end (bug fixed: MemoryError)
    open_refused(lay, "not a regular file")


def test_expert_file_replaced_by_a_fifo_is_refused_without_opening_it(lay: Path) -> None:
    rel = Layout.open(lay).manifest.expert(1, 2).file
    (lay / rel).unlink()
    os.mkfifo(lay / rel)  # opening it for reading would block: refusing it proves nothing was read
    open_refused(lay, r"expert_002\.bin: not a regular file")


def test_symlinked_directory_and_tokenizer_leading_outside_are_refused(lay: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.move(lay / "experts" / "layer_001", outside)
    os.symlink(outside, lay / "experts" / "layer_001")
    open_refused(lay, "outside the layout")
    os.unlink(lay / "experts" / "layer_001")
    shutil.move(outside, lay / "experts" / "layer_001")
    Layout.open(lay)
    tok = next(p for p in Layout.open(lay).manifest.files if p.startswith("tokenizer/"))
    shutil.move(lay / tok, tmp_path / "tok")
    os.symlink(tmp_path / "tok", lay / tok)
    open_refused(lay, "outside the layout")


def test_absurd_counts_in_the_config_are_refused_at_once(lay: Path) -> None:
    m = json.loads((lay / "manifest.json").read_text())
    m["config"]["n_layers"] = 2**40  # a loop over layers would never end (bug fixed)
    (lay / "manifest.json").write_text(json.dumps(m))
    open_refused(lay, "missing")


def test_a_directory_left_by_an_interrupted_conversion_is_never_a_layout(lay: Path) -> None:
    (lay / PARTIAL_MARKER).write_text("123\n")  # e.g. killed between the final rename and the marker's removal
    open_refused(lay, "interrupted conversion")


# ---------------------------------------------------------------- faults under a live Engine
def test_experts_deleted_while_running_fail_naming_the_file_and_the_engine_recovers(lay: Path) -> None:
    with Engine.open(lay, cache_mb=2.5 * slot_mb(lay), prefetch="none") as eng:
        want = eng.forward(PROMPT)
    with Engine.open(lay, cache_mb=2.5 * slot_mb(lay), prefetch="none") as eng:  # open: the layout was checked
        paths = [lay / eng.layout.manifest.expert(1, e).file for e in range(4)]
        saved = [p.read_bytes() for p in paths]
        for p in paths:  # every expert of layer 1: whichever the router picks is gone
            p.unlink()
        with pytest.raises(ExpertReadError, match=r"layer_001/expert_00\d\.bin: layer 1 expert \d: read failed after 4 "
                                                  r"attempts \(.*cannot open \(No such file"):
            eng.forward(PROMPT)
        for p, d in zip(paths, saved, strict=True):
            p.write_bytes(d)
        eng.reset()  # the files come back: the same engine serves again, with the same logits
        np.testing.assert_array_equal(eng.forward(PROMPT), want)


def test_expert_truncated_while_running_fails_naming_it_then_recovers(lay: Path) -> None:
    ids = PROMPT
    with Engine.open(lay, cache_mb=2.5 * slot_mb(lay), prefetch="none") as eng:
        want = eng.forward(ids)
        paths = [lay / eng.layout.manifest.expert(0, e).file for e in range(4)]
        saved = [p.read_bytes() for p in paths]
        for p in paths:  # every expert of layer 0: whichever the router picks is short now
            os.truncate(p, 4096)
        eng.reset()
        with pytest.raises(ExpertReadError, match=r"layer_000/expert_00\d\.bin: layer 0 expert \d: read failed after 4 "
                                                  r"attempts \(short read"):
            eng.forward(ids)
        assert eng.stats()["read_retries"] >= 3
        for p, d in zip(paths, saved, strict=True):
            p.write_bytes(d)
        eng.reset()
        np.testing.assert_array_equal(eng.forward(ids), want)


# ---------------------------------------------------------------- faults under a live server
class Running:
    def __init__(self, app: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health").status_code != 200 if self.server.started else True:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not become healthy"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def test_server_fails_one_request_naming_the_file_and_serves_the_next(lay: Path) -> None:
    broken: set[int] = set()  # inode numbers whose reads fail with EIO
    engines: list[Engine] = []

    def flaky(fd: int, view: memoryview, offset: int) -> int:
        if os.fstat(fd).st_ino in broken:
            raise OSError(errno.EIO, "Input/output error")
        return os.preadv(fd, [view], offset)

    def load() -> Engine:
        eng = Engine.open(lay, cache_mb=2.5 * slot_mb(lay), prefetch="none")
        eng.store.read_fn = flaky
        engines.append(eng)
        return eng

    srv = Running(create_app(ServerConfig(str(lay)), load=load))
    body = {"model": "tiny-q4", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    try:
        solo = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        m = Layout.open(lay).manifest
        broken.update(os.stat(lay / m.expert(layer, e).file).st_ino for layer in (0, 1) for e in range(4))
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 500 and err["code"] == "generation_failed" and set(err) >= {"message", "type", "code"}
        assert "expert_00" in err["message"] and "read failed after 4 attempts" in err["message"], err
        # streamed: the error arrives as an event, then [DONE]
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and "expert_00" in json.loads(events[-2])["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200
        broken.clear()  # the disk recovers: the same server answers, and answers right
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == solo
        # a real file change: every expert of layer 0 truncated under the running server, then restored
        paths = [lay / m.expert(0, e).file for e in range(4)]
        saved = [p.read_bytes() for p in paths]
        for p in paths:
            os.truncate(p, 4096)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and "layer_000/expert_00" in r.json()["error"]["message"], r.text
        for p, d in zip(paths, saved, strict=True):
            p.write_bytes(d)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == solo
        finished = {s.labels["reason"]: s.value for f in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
                    for s in f.samples if s.name == "mertools_generations_finished_total"}
        assert finished["error"] == 3, finished
    finally:
        srv.stop()


# ---------------------------------------------------------------- hostile sources, refused at once
def test_absurd_counts_and_special_files_in_sources_are_refused_at_once(tiny: dict, tmp_path: Path) -> None:
    from mertools.convert.source import open_source
    from mertools.errors import SourceError

    data = bytearray(tiny["q4_0"].read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # GGUF type uint32
    data[at + 4:at + 8] = (2**31).to_bytes(4, "little")  # bug fixed: convert looped over 2**31 layers
    bad = tmp_path / "layers.gguf"
    bad.write_bytes(bytes(data))
    with time_limit(10), pytest.raises(SourceError, match="block_count 2147483648"):
        convert(bad, tmp_path / "out", ConvertOptions(progress=False))
    hf = Path(shutil.copytree(tiny["hf"], tmp_path / "hf"))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["num_hidden_layers"] = 2**40
    (hf / "config.json").write_text(json.dumps(cfg))
    with time_limit(10), pytest.raises(SourceError, match="cannot fit"):
        convert(hf, tmp_path / "out", ConvertOptions(progress=False))
    (hf / "config.json").unlink()
    os.mkfifo(hf / "config.json")  # bug fixed: reading it blocked forever
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with time_limit(10):
        for path, what in ((hf, "config.json: not a regular file"), (fifo, "model.gguf: not a regular file")):
            with pytest.raises(SourceError, match=what):
                open_source(path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
