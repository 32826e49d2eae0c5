"""Property-based fuzzing of every parser of untrusted files (GGUF, safetensors header, manifest,
tokenizer files): each mutated real file either works or ends in a MertoolsError naming the file,
within a time limit and an address-space limit; a sample goes through the CLI (exit 2, one line).

CI runs MERTOOLS_FUZZ_EXAMPLES (default 40) generated cases per target, derandomized; the long form is
`python benchmarks/fuzz_parsers.py` (thousands of cases, and atheris when installed). Figures:
docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fixtures.fuzz import TARGET_NAMES, Target, address_space_limit, all_targets, sync_manifest, time_limit

EXAMPLES = int(os.environ.get("MERTOOLS_FUZZ_EXAMPLES", "40"))
CASE_SECONDS = 30  # far above any case's real time (< 0.5 s): a hang fails instead of blocking CI
EXTRA_ADDRESS_SPACE = 3 << 30  # what one case may map beyond what the process had: no absurd allocations
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def targets(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    return {t.name: t for t in all_targets(tiny, tmp_path_factory.mktemp("fuzz"))}


def _cli(t: Target, data: bytes) -> tuple[int, str]:
    """Run the target's CLI command on `data` in a subprocess with 3 GiB of address space and a timeout."""
    t.file.write_bytes(data)
    if t.name.startswith("tokenizer"):  # past Layout.open's size check, into the tokenizer parser
        lay = t.file.parent.parent
        sync_manifest(lay, str(t.file.relative_to(lay)))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    try:
        res = subprocess.run([sys.executable, "-m", "mertools.cli", *t.cli], capture_output=True, text=True,
                             cwd=ROOT, timeout=120, preexec_fn=limit)
    finally:
        t.restore()
        if t.name.startswith("tokenizer"):
            sync_manifest(lay, str(t.file.relative_to(lay)))
    return res.returncode, res.stderr


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_fuzzed_inputs_work_or_fail_with_a_clear_error(targets: dict[str, Target], name: str) -> None:
    t = targets[name]
    t.counts.update(cases=0, accepted=0, refused=0)
    refused: list[bytes] = []

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(t.strategy())
    def case(c: tuple) -> None:
        data = t.materialize(c)
        with time_limit(CASE_SECONDS):
            outcome = t.check(data)
        if outcome != "accepted" and len(refused) < 3 and data not in refused:
            refused.append(data)

    try:
        with address_space_limit(EXTRA_ADDRESS_SPACE):
            case()
    finally:
        t.restore()
    print(f"\nfuzz {name}: {t.counts}")
    assert t.counts["cases"] >= EXAMPLES and t.counts["refused"] > 0, t.counts
    # the same contract through the command line: exit status 2, one line naming the file, no traceback
    for data in refused:
        code, err = _cli(t, data)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("mertools: error: "), (code, err)
        assert t.file.name in lines[0] or str(t.work) in lines[0], lines[0]
    assert not (t.work / "out").exists() and not (t.work / "out.partial").exists()
