"""A plain launch of the demo job that several launch tests read (tests/integration/test_launch.py,
test_observe.py): each launch costs seconds of interpreter and rank start-up, so the tests that
need an ordinary finished run share this one instead of each starting its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_launch import STEPS, _run

# what the sharing tests read: checkpoints at steps 20 and 30 (resume, another world size), the
# routing of the logged steps (the observer's records)
PLAIN_FLAGS = [*STEPS, "--ckpt-every", "20", "--record-routing"]


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``(OUT, result)`` of ``python -m launch.train`` on 2 spawned ranks with ``PLAIN_FLAGS``, run
    once per session. Tests read ``OUT``; one that resumes from it works on a copy."""
    out = tmp_path_factory.mktemp("plain")
    return out, _run([sys.executable, "-m", "launch.train", "--out", str(out), *PLAIN_FLAGS])
