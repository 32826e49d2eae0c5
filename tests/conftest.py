from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fixtures/ generators live at the repo root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Mixtral as a HF directory and as GGUFs (merged f16/q4_0/q8_0, per-expert f16)."""
    from fixtures.tiny_mixtral import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), seed=0)
