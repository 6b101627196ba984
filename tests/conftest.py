import os
import sys

# spawned ranks import test modules as ``tests.<...>``: keep the repo root importable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_sessionstart(session) -> None:
    """DeepSpeed compiles its CPU shared-memory comm extension on first use (about 90 s on 2
    cores). Build it before any test starts, so that time never counts against a test's timeout."""
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # DeepSpeed is optional; its tests skip without it
        return
    build_shm_op()
