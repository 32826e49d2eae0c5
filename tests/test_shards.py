"""Expert-parallel serving on Ray (runtime/shards.py): with 2 and 4 local actors the logits are bit for bit the
single-process engine's, on the trained fixture and on tiny families; a shard killed mid-step fails that step
with the shard named, and the next step succeeds on the restarted actor."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mertools.convert.pipeline import ConvertOptions, convert
from mertools.errors import RuntimeConfigError
from mertools.runtime.engine import Engine
from mertools.runtime.shards import Plan, ShardedExperts, ShardError

ray = pytest.importorskip("ray", reason="expert shards need ray (the test extra installs it)")

TRAINED = Path(__file__).resolve().parent.parent / "fixtures" / "trained" / "tiny-shakespeare-moe"
IDS = [5, 17, 42, 9, 100, 3, 77, 21]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    """One Ray instance of this machine for the module (2 CPUs; the shards ask for none, so any count fits)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # this module's functions run inside actors (`_stall`), whose path lacks tests/: sent by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(TRAINED, tmp_path_factory.mktemp("shards") / "q4_0", ConvertOptions(dtype="q4_0", progress=False)).out


def _logits(layout: Path, **kw: Any) -> list[np.ndarray]:
    """A prompt's logits, then three decode steps' (the last one with two rows of another sequence beside it)."""
    with Engine.open(layout, **kw) as eng:
        out = [eng.forward(IDS)]
        for t in (7, 8):
            out.append(eng.forward([t]))
        other = eng.new_sequence(32)
        out.extend(eng.step([(eng.model.kv, [9]), (other, [1, 2])]))
        return out


# ---------------------------------------------------------------------- placement
def test_plans() -> None:
    rr = Plan.round_robin(4, 8, 3)
    assert sorted(k for s in range(3) for k in rr.keys(s)) == [(layer, e) for layer in range(4) for e in range(8)]
    assert all(len(rr.keys(s)) in (10, 11) for s in range(3))
    counts = np.zeros((2, 8))
    counts[0] = [100, 90, 1, 1, 1, 1, 1, 1]
    counts[1] = [5] * 8
    freq = Plan.by_frequency(counts, 2)
    assert freq.owner[0][0] != freq.owner[0][1]  # the two hot experts of layer 0 on different shards
    assert sorted(freq.owner[1]).count(0) == 4  # an even layer split evenly


def test_plan_file(tmp_path: Path) -> None:
    p = Plan.round_robin(4, 8, 2)
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json", 4, 8) == p
    with pytest.raises(RuntimeConfigError, match="a plan of 4 layers"):
        Plan.load(tmp_path / "plan.json", 5, 8)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RuntimeConfigError, match="not a shard plan"):
        Plan.load(tmp_path / "bad.json", 4, 8)


# ---------------------------------------------------------------------- the same bits
@pytest.mark.parametrize("shards,kernels", [(2, "exact"), (4, "int8")])
def test_sharded_logits_are_the_single_process_ones(trained: Path, shards: int, kernels: str) -> None:
    # on the layer loop, as a sharded engine runs (its experts computed elsewhere; the compiled step's bits are the
    # same, tests/test_fused_step.py): the experts' kernel (experts8), compiled here once, is then loaded from numba's
    # cache by the actors, which otherwise each compiled it at once (72 s against 10 s warm, in `make test`)
    want = _logits(trained, kernels=kernels, compiled_step=False)
    got = _logits(trained, kernels=kernels, shards=shards)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_sharded_under_a_budget_and_from_a_frequency_plan(trained: Path, tmp_path: Path) -> None:
    """Shards streaming their experts through 2 slots each, placed by use: still the same bits."""
    from mertools.layout import Layout

    mb = 2.5 * max(e.nbytes for e in Layout.open(trained).manifest.experts) / 2**20
    want = _logits(trained, kernels="int8", cache_mb=mb)  # streaming too: unpacked, as the shards' slots
    counts = np.random.default_rng(0).integers(1, 100, (4, 8))
    Plan.by_frequency(counts, 2).save(tmp_path / "plan.json")
    got = _logits(trained, kernels="int8", plan=tmp_path / "plan.json", cache_mb=mb)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


# every tiny family (gpt-oss's biases and clamped GLU, shared experts with and without a gate, expert groups, sigmoid
# routing, latent attention), 2 or 4 shards
@pytest.mark.parametrize("family,shards", [("qwen3_moe", 4), ("olmoe", 2), ("qwen2_moe", 2), ("glm4_moe", 4),
                                           ("gpt_oss", 2), ("deepseek_v2", 4), ("deepseek_v3", 2)])
def test_tiny_families_sharded(family: str, shards: int, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from fixtures.tiny_families import build_hf

    layout = convert(build_hf(family, tmp_path / "hf"), tmp_path / "lay", ConvertOptions(dtype="q8_0", progress=False)).out
    want = _logits(layout, kernels="int8")
    got = _logits(layout, kernels="int8", shards=shards)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


# ---------------------------------------------------------------------- a shard that dies
def _stall(shard: Any) -> None:  # noqa: ANN401 - runs inside the actor, on the shard itself
    """Its next calls hang in their computation (a restarted actor is a fresh shard, without this)."""
    import time

    def stalled(*args: Any) -> None:  # noqa: ANN401
        time.sleep(120.0)

    shard.moe.contributions = stalled


class _KillsAShard(ShardedExperts):
    """The real driver and actors; once armed, it kills shard `victim`'s actor while its call of the step computes.

    The call is made to hang first: a call of a few experts otherwise raced the kill and returned (CI, stop 38), and
    Ray hands a call that had not started to the restarted actor."""

    victim: int | None = None

    def _submit(self, *args: Any) -> dict[int, Any]:  # noqa: ANN401
        import time

        if self.victim is None:
            return super()._submit(*args)
        ray.get(self.actors[self.victim].__ray_call__.remote(_stall))
        calls = super()._submit(*args)
        if self.victim in calls:
            time.sleep(1.0)  # computing
            ray.kill(self.actors[self.victim], no_restart=False)  # Ray restarts it
            self.victim = None
        return calls


def test_a_killed_shard_fails_the_step_in_flight_and_the_next_one_succeeds(trained: Path) -> None:
    from mertools.layout import Layout
    from mertools.runtime.batch import Batch, SeqRows

    rng = np.random.default_rng(1)
    h = rng.standard_normal((3, Layout.open(trained).manifest.config.d_model)).astype(np.float32)
    chosen, weights = np.array([[0, 1], [2, 3], [1, 2]]), np.full((3, 2), 0.5, np.float32)
    batch = Batch((SeqRows(None, 0, 3),), np.arange(3), np.zeros(3, np.int64))  # type: ignore[arg-type]
    with Engine.open(trained, kernels="int8") as eng:  # every expert resident, as the shards hold theirs
        want = eng.model.moe.contributions(0, [0, 1, 2, 3], h, chosen, weights, batch, None)
    drv = _KillsAShard(str(trained), Plan.round_robin(4, 8, 2), "int8")  # layer 0: shard 1 holds the odd experts
    try:
        assert np.array_equal(drv(0, h, chosen, weights, None, batch), want)
        drv.victim = 1
        with pytest.raises(ShardError, match=r"expert shard 1 \(layer 0, experts \[1, 3\]\) failed") as err:
            drv(0, h, chosen, weights, None, batch)
        assert "failed: Actor" in str(err.value), err.value  # Ray's word that the actor died (or restarted) in the call
        assert np.array_equal(drv(0, h, chosen, weights, None, batch), want)  # the restarted actor
    finally:
        drv.close()


def test_the_server_fails_only_the_request_in_flight_when_a_shard_dies(trained: Path) -> None:
    import json
    import time

    import httpx
    from test_server import Running  # tests/ is on sys.path (pytest's rootdir-relative import)

    from mertools.server.app import ServerConfig, create_app

    srv = Running(create_app(ServerConfig(str(trained), shards=2, kernels="int8")))
    try:
        srv.wait_healthy(120)
        body = {"model": "q4_0", "prompt": "ROMEO:", "max_tokens": 400, "temperature": 0, "stream": True}
        pieces, errors = 0, []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"]["message"])
                    continue
                pieces += 1
                if pieces == 5:  # mid-stream: shard 1's actor dies (Ray restarts it) in a call of the stream
                    actor = srv.app.state.scheduler.engine.shards.actors[1]
                    ray.get(actor.__ray_call__.remote(_stall))  # the stream's next call to it hangs computing
                    time.sleep(2.0)
                    ray.kill(actor, no_restart=False)
        assert pieces >= 5 and len(errors) == 1 and "expert shard 1" in errors[0], errors
        again = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 8}, timeout=300)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
    finally:
        srv.stop()


def test_shard_plan_command_and_a_ray_cluster_address(trained: Path, tmp_path: Path) -> None:
    """`mertools shard-plan` from a routing history, then `mertools run --shard-plan --ray-address` against a Ray
    head started apart (a cluster address, as on many machines): the text of the single-process run."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    ray_cmd = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cli = [sys.executable, "-m", "mertools.cli"]
    history = tmp_path / "history.json"
    run = [*cli, "run", str(trained), "-p", "ROMEO:", "-n", "12"]
    single = subprocess.run([*run, "--history", str(history)], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    made = subprocess.run([*cli, "shard-plan", str(trained), "2", str(tmp_path / "plan.json"), "--history", str(history)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and "2 shards, 16, 16 experts each" in made.stdout, made.stdout + made.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # in a session of its own, stopped by signalling that session only (`ray stop` would end every Ray of the machine,
    # this module's own instance included), its files in a directory of its own (the default one's address file would
    # outlive it and send a later `ray.init()` to a dead cluster); a short path: Ray's socket paths are bounded
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head = subprocess.Popen([ray_cmd, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray_cmd, "status", "--address", f"127.0.0.1:{port}"], capture_output=True, env=env,
                             timeout=60).returncode != 0:  # up, its node registered
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        sharded = subprocess.run([*run, "--shard-plan", str(tmp_path / "plan.json"), "--ray-address",
                                  f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300, env=env)
        assert sharded.returncode == 0, sharded.stderr
        assert sharded.stdout == single.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
