import os
import sys

# spawned ranks import test modules as ``tests.<...>``: keep the repo root importable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
