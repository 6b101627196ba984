"""The DeepSpeed examples run (2 gloo ranks each), and the docs show their lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(name: str) -> str:
    out = subprocess.run([sys.executable, os.path.join("examples", name)], cwd=ROOT, capture_output=True, text=True,
                         timeout=400, env={**os.environ, "PYTHONPATH": ROOT})  # this checkout's package
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def snippet_is_in_the_doc(example: str, doc: str, section: str) -> None:
    """The doc's python block under ``section`` is the example's snippet, dedented."""
    with open(os.path.join(ROOT, "examples", example)) as f:
        source = f.read()
    lines = source.split("# snippet: start\n")[1].split("# snippet: end")[0].splitlines()
    snippet = "\n".join(line[4:] for line in lines).strip()
    with open(os.path.join(ROOT, "docs", doc)) as f:
        text = f.read()
    block = re.search(rf"## {section}\n.*?```python\n(.*?)```", text, re.S).group(1).strip()
    assert block == snippet


@pytest.mark.slow
def test_the_hf_deepspeed_example_saves_what_plain_transformers_reloads():
    snippet_is_in_the_doc("hf_deepspeed.py", "huggingface.md", "Under DeepSpeed")
    stdout = run_example("hf_deepspeed.py")
    diff = float(re.search(r"max \|logits - trained logits\| = (\S+)", stdout).group(1))
    assert diff < 1e-5, stdout


@pytest.mark.slow
def test_the_deepspeed_example_trains_and_reloads_its_checkpoint():
    snippet_is_in_the_doc("deepspeed_moe.py", "deepspeed.md", "A runnable example")
    stdout = run_example("deepspeed_moe.py")
    for saved, reloaded in re.findall(r"(\S+) saved, (\S+) reloaded", stdout):
        assert float(saved) == float(reloaded), stdout
    assert len(re.findall("reloaded", stdout)) == 2
