"""End-to-end launches of the demo job on CPU: plain spawn, torchrun (1 node x 2, 2 nodes x 1),
resume, bad flags, a dying rank; the Hugging Face models (``--hf-model``, ``--hf-path``, saving back
to plain transformers, DeepSpeed); the real-text corpus. Each launch checks metrics.jsonl and that
the loss falls."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from expert_parallel.spawn import free_port
from launch.train import build_parser, check_flags, given_flags

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
# a smaller model than the demo's default: these tests check launching, not learning speed
SMALL = ["--d-model", "32", "--d-ff", "64", "--seq-len", "32", "--batch-size", "8"]
STEPS = ["--steps", "30", "--log-every", "10", *SMALL]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_trained(out: Path, steps: int = 30) -> list[dict]:
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(10, steps + 1, 10))
    for record in records:
        assert set(record) >= {"step", "loss", "aux_loss", "drop_fraction", "k_eff", "load_cv",
                               "padding_fraction", "wire_mib", "grad_norm", "tokens_per_s", "step_ms"}
        assert record["grad_norm"] is None or 0 < record["grad_norm"] < math.inf
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], records
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    return records


def _resumable_copy(run: Path, to: Path, step: int) -> Path:
    """A copy of the finished launch ``run`` whose ``latest`` checkpoint is ``step<step>`` (one of
    the two it keeps), as if it had stopped there: ``--resume`` continues from ``step``."""
    shutil.copytree(run, to)
    (to / "checkpoint" / "latest").write_text(f"step{step}")
    return to


def test_plain_launch_spawns_two_ranks_and_the_loss_falls(plain_run) -> None:
    out, result = plain_run
    assert result.returncode == 0, result.stderr
    _assert_trained(out)
    assert "summary:" in result.stdout


def test_torchrun_two_nodes_on_localhost_train_together_as_the_plain_launch(tmp_path: Path, plain_run) -> None:
    """torchrun with a c10d rendezvous, two nodes of one rank each: the same job as the plain launch
    of two spawned ranks, so the same losses (the plain launch also checkpoints and records its
    routing, which change nothing of the training), up to rounding: torchrun sets
    OMP_NUM_THREADS=1 only with several ranks per node, and the thread count changes the CPU
    matmuls' last bits."""
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int) -> subprocess.Popen:
        cmd = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
               "-m", "launch.train", "--out", str(tmp_path), *STEPS]
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    try:
        outputs = [proc.communicate(timeout=180) for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], outputs
    records = _assert_trained(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert records[0]["k_eff"] > 1.0
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in _metrics(plain_run[0])], rel=1e-4)


def test_resume_continues_with_the_same_losses(tmp_path: Path, plain_run) -> None:
    full = plain_run[0]
    resumed = _resumable_copy(full, tmp_path / "resumed", 20)  # the full run, stopped at step 20
    result = _run([sys.executable, "-m", "launch.train", "--out", str(resumed), "--resume", *STEPS])
    assert result.returncode == 0, result.stderr
    assert len(_metrics(resumed)) == 3  # step 30's record was dropped at the resume, then written again
    assert _metrics(resumed) == [
        {**r, "tokens_per_s": m["tokens_per_s"], "step_ms": m["step_ms"]}
        for r, m in zip(_metrics(full), _metrics(resumed))
    ]
    assert json.loads((resumed / "summary.json").read_text())["start_step"] == 20


def test_resume_at_another_world_and_ep_size(tmp_path: Path, plain_run) -> None:
    out = _resumable_copy(plain_run[0], tmp_path / "out", 30)  # saved at world size 2, EP 2
    resumed = _run([sys.executable, "-m", "launch.train", "--out", str(out), "--steps", "32", "--log-every", "2",
                    "--resume", "--nproc", "4", "--ep-size", "4", *SMALL])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("was trained with a global batch of 16 sequences, this job has 32 (--batch-size x world size); it "
            "continues from step 30 on other batches than the saved run would have seen (--batch-size 4 keeps "
            "them)") in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["start_step"], summary["world_size"], summary["ep_size"]) == (30, 4, 4)
    assert [r["step"] for r in _metrics(out)] == [10, 20, 30, 32]
    assert (out / "checkpoint" / "latest").read_text().strip() == "step32"


def test_a_bad_flag_is_a_one_line_error_before_any_process_starts(tmp_path) -> None:
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--ep-size", "3"], timeout=60)
    assert result.returncode == 2
    assert "--ep-size 3 does not divide the world size 2" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert time.perf_counter() - start < 30


def _main_exit(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``launch.train.main(argv)`` in this process: its exit code and the last line of its stderr
    (``--help``: its stdout). Starting a rank or a process group fails the test."""
    from launch import train

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("launch.train started a rank")

    monkeypatch.delenv("RANK", raising=False)  # a plain launch, not one under a launcher
    monkeypatch.setattr(train.mp, "start_processes", started)
    monkeypatch.setattr(train, "_run_rank", started)
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    captured = capsys.readouterr()
    return exit.value.code, (captured.out if argv == ["--help"] else captured.err.strip().splitlines()[-1])


@pytest.mark.parametrize("flags, message", [  # the command line's path: test_a_bad_flag_is_a_one_line_error...
    (["--experts", "5", "--ep-size", "2"], "--experts=5 is invalid: it is not divisible by --ep-size=2"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--simulate-failure", "x"], "expected RANK:STEP or RANK:STEP:hang"),
    (["--simulate-failure", "1:3:stall"], "expected RANK:STEP or RANK:STEP:hang"),
])
def test_bad_flags_exit_with_a_usage_error_naming_them(tmp_path, monkeypatch, capsys, flags, message) -> None:
    code, last_line = _main_exit(["--out", str(tmp_path), *flags], monkeypatch, capsys)
    assert code == 2 and message in last_line


@pytest.mark.parametrize("flags, message", [
    (["--d-model", "63"], "--d-model 63 is not divisible by --heads 4"),
    (["--heads", "0"], "--heads 0: must be >= 1"),
    (["--seq-len", "0"], "--seq-len 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--layers", "1"], "--layers 1: every other block is MoE"),
    (["--ep-size", "0"], "--ep-size 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--ckpt-every", "-1"], "--ckpt-every -1 must be >= 0"),
    (["--clip-grad", "-1"], "--clip-grad -1.0: must be a finite number >= 0 (0 turns clipping off)"),
    (["--clip-grad", "inf"], "--clip-grad inf: must be a finite number >= 0"),
])
def test_model_flags_the_run_cannot_build_are_rejected_by_name(flags, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_flags(build_parser().parse_args(flags), 2, given_flags(flags))
    check_flags(build_parser().parse_args([]), world_size=2)  # the defaults pass


def test_a_dying_rank_ends_the_job_with_a_message(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--steps", "50", *SMALL,
                   "--simulate-failure", "1:5", "--timeout-s", "30"], timeout=120)
    assert result.returncode != 0
    assert "rank 1 failed" in result.stderr
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_a_stalled_rank_is_named_with_where_every_rank_stopped(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--steps", "50", *SMALL,
                   "--simulate-failure", "1:3:hang", "--timeout-s", "10"], timeout=120)
    assert result.returncode != 0
    assert time.perf_counter() - start < 60
    assert "rank(s) 1 never arrived (rank 0 gave up waiting" in result.stderr
    table = result.stderr[result.stderr.index("rank  host"):].splitlines()
    assert table[0].split() == ["rank", "host", "step", "MoE", "layer", "last", "event", "tokens", "capacity", "idle"]
    rows = {row.split()[0]: row.split() for row in table[1:3]}
    # rank 1 entered the first MoE layer of step 3 and stalled; rank 0 routed and waits for it
    assert rows["1"][2:5] == ["3", "0", "fwd/enter"] and rows["1"][-3:] == ["<-", "never", "arrived"]
    assert rows["0"][2:5] == ["3", "0", "fwd/route"] and rows["0"][-1] == "waiting"
    assert rows["0"][5] == str(8 * 32)  # tokens of that forward; the capacity of its last one
    assert int(rows["0"][6]) > 0


def test_deepspeed_launcher_zero2_bf16_trains_and_writes_engine_checkpoints(tmp_path: Path) -> None:
    """One launch (bf16 steps are slow on CPU); resuming a DeepSpeed engine checkpoint, the same code
    for every model, is checked by test_deepspeed_trains_a_converted_model_with_expert_groups_and_resumes_exactly."""
    pytest.importorskip("deepspeed")
    result = _run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), "--module",
                   "launch.train", "--out", str(tmp_path), "--steps", "20", "--log-every", "10", "--ckpt-every", "10",
                   "--deepspeed-config", "launch/ds_zero2_bf16.json", *SMALL])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_trained(tmp_path, steps=20)
    assert json.loads((tmp_path / "summary.json").read_text())["deepspeed"] is True
    assert (tmp_path / "checkpoint" / "step20").is_dir()  # an engine checkpoint, per-expert files
    assert list((tmp_path / "checkpoint" / "step20").glob("layer_*_expert_*_model_states.pt"))
    assert (tmp_path / "checkpoint" / "latest").read_text().strip() == "step20"


def test_a_rendezvous_that_never_completes_ends_within_its_join_timeout(tmp_path: Path) -> None:
    start = time.perf_counter()  # node 1 of 2 never comes
    result = _run([*TORCHRUN, "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "lonely",
                   "--rdzv-conf", "join_timeout=5", "-m", "launch.train", "--out", str(tmp_path), *STEPS], timeout=120)
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "metrics.jsonl").exists()


def test_help_lists_every_flag_with_its_default(monkeypatch, capsys) -> None:
    code, help_text = _main_exit(["--help"], monkeypatch, capsys)
    assert code == 0
    help_text = " ".join(help_text.split())
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            name = action.option_strings[0]
            assert name in help_text
            assert f"(default: {action.default})" in help_text, f"{name} shows no default"


# --- the real-text corpus ---------------------------------------------------------------------

FUNCTION_WORDS = {"the", "of", "and", "a", "to", "in", "is", "that", "it", "his", "as", "with", "be", "by", "for",
                  "which", "not", "or", "an", "was", "he", "who", "from", "but", "are", "this", "on", "at", "one"}


def test_the_default_corpus_is_real_english_text_and_batches_decode_to_it() -> None:
    from launch.corpus import BIERCE, CharCorpus

    text = BIERCE.read_text(encoding="ascii")
    corpus = CharCorpus.named("bierce")
    assert build_parser().parse_args([]).corpus == "bierce"
    assert len(set(re.findall(r"[a-z]+", text.lower()))) > 5000  # a real vocabulary, not the toy grammar's
    inputs, targets = corpus.batch(step=3, rank=1, batch_size=8, seq_len=64)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    words = []
    for row_in, row_target in zip(inputs, targets):
        window = corpus.decode(row_in) + corpus.decode(row_target[-1:])
        assert window in text  # ids decode back to the file's characters
        words += re.findall(r"[a-z]+", window.lower())
    assert sum(word in FUNCTION_WORDS for word in words) >= 0.2 * len(words), words


# --- Hugging Face models ------------------------------------------------------------------------

HF_READY = find_spec("transformers") is not None and find_spec("expert_parallel.integrations.huggingface") is not None
needs_hf = pytest.mark.skipif(not HF_READY, reason="needs transformers and expert_parallel.integrations.huggingface")
# one family end to end on 2 ranks (every family builds and steps through the launcher in
# test_hf_launch.py; every family runs at EP 2 in test_huggingface.py)
HF_MODELS = ("mixtral",)
HF_SMALL = ["--d-model", "32", "--d-ff", "64", "--layers", "2", "--seq-len", "32", "--batch-size", "8"]
HF_STEPS = ["--steps", "8", "--log-every", "2", *HF_SMALL]


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory: pytest.TempPathFactory):
    """``name -> (OUT, result)`` of an 8-step run of the tiny ``--hf-model name`` on 2 ranks (once each)."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def run(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = out, _run([sys.executable, "-m", "launch.train", "--out", str(out), "--hf-model", name,
                                    *HF_STEPS])
        return done[name]

    return run


def _char_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy of a plain transformers model on ``ids [B, T+1]`` (T targets)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@needs_hf
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", HF_MODELS)
def test_each_hf_model_trains_on_two_ranks_and_saves_a_plain_transformers_checkpoint(hf_runs, name) -> None:
    import transformers

    from expert_parallel.integrations.huggingface import ExpertParallelBlock
    from launch.corpus import CharCorpus

    out, result = hf_runs(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert records[0]["loss"] < math.log(CharCorpus.named("bierce").vocab_size) + 0.05  # a random init: ~uniform
    assert records[-1]["loss"] < 0.93 * records[0]["loss"], records
    for record in records:  # converted blocks are dropless, top-2
        assert record["drop_fraction"] == 0.0 and record["k_eff"] == 2.0 and record["load_cv"] > 0
        # the model's own router aux loss, from the router logits the converted blocks record
        assert record["aux_loss"] > 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"], summary["ep_size"], summary["world_size"]) == (name, 2, 2)

    # OUT/hf is a plain transformers checkpoint with every expert of both EP ranks: it reproduces
    # the trained converted model's logits (a missing expert would be randomly re-initialised)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    assert loaded.config.model_type == name
    assert not any(isinstance(module, ExpertParallelBlock) for module in loaded.modules())
    probe = torch.load(out / "hf_probe.pt")
    with torch.no_grad():
        logits = loaded(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)


@needs_hf
@pytest.mark.timeout(180)
def test_hf_path_starts_from_a_saved_model(hf_runs, tmp_path: Path) -> None:
    import transformers

    from launch.corpus import CharCorpus
    from launch.hf import lm_window

    saved = hf_runs("mixtral")[0] / "hf"
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--hf-path", str(saved),
                   "--steps", "2", "--log-every", "1", "--seq-len", "32", "--batch-size", "8"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # step 1's loss is the saved model's on the first batches: plain transformers computes it too
    corpus, model = CharCorpus.named("bierce"), transformers.AutoModelForCausalLM.from_pretrained(saved)
    expected = sum(_char_loss(model, lm_window(*corpus.batch(0, rank, 8, 32, 2))) for rank in (0, 1)) / 2
    records = _metrics(tmp_path)
    assert records[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert records[0]["loss"] < _metrics(hf_runs("mixtral")[0])[0]["loss"] - 0.3  # trained, not a fresh init
    assert (tmp_path / "hf" / "config.json").is_file()


@needs_hf
@pytest.mark.timeout(240)
def test_deepspeed_trains_a_converted_model_with_expert_groups_and_resumes_exactly(hf_runs, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def deepspeed(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return _run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), "--module",
                     "launch.train", "--out", str(out), "--hf-model", "mixtral", *HF_STEPS, "--ckpt-every", "4",
                     "--deepspeed-config", "launch/ds_zero2_bf16.json", *extra])

    result = deepspeed(full)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((full / "summary.json").read_text())["deepspeed"] is True
    # the engine reduced each expert's gradient over its own replicas, not over the other EP rank's
    # experts: the trained experts are the plain-torch run's (same seed; bf16 and ZeRO rounding apart)
    plain = load_file(hf_runs("mixtral")[0] / "hf" / "model.safetensors")
    ours = load_file(full / "hf" / "model.safetensors")
    keys = [key for key in plain if ".experts." in key]
    diff = torch.cat([(plain[key] - ours[key].float()).abs().flatten() for key in keys])
    assert diff.mean() < 4e-3, diff.mean()  # ~1e-3; 2e-2 when the engine treats experts as dense
    # resume from step 4 (DeepSpeed's `latest` names the tag): the same losses as the full run
    shutil.copytree(full, resumed)
    (resumed / "checkpoint" / "latest").write_text("step4")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (full / "metrics.jsonl").read_text().splitlines()[:2]))
    result = deepspeed(resumed, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(full)]


@needs_hf
def test_a_demo_model_flag_with_an_hf_model_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    code, last_line = _main_exit(["--out", str(tmp_path), "--hf-model", "mixtral", "--preset", "switch"], monkeypatch,
                                 capsys)
    assert code == 2 and "--preset switch does not apply to --hf-model mixtral" in last_line


@pytest.mark.parametrize("flags, message", [
    (["--hf-model", "mixtral", "--preset", "gshard"], "--preset gshard does not apply to --hf-model mixtral"),
    (["--hf-model", "mixtral", "--experts", "3"], "--experts=3 is invalid: it is not divisible by --ep-size=2; choose"),
    (["--hf-model", "mixtral", "--experts", "1"], "--experts 1: the tiny models route each token to 2 experts"),
    (["--hf-model", "mixtral", "--layers", "0"], "--layers 0: must be >= 1"),
    (["--hf-model", "qwen3_moe", "--d-model", "36"], "--d-model 36 / --heads 4 is an odd head width"),
    (["--hf-model", "nope"], "--hf-model nope: 'nope' is not a supported Hugging Face family; choose one of"),
    (["--hf-model", "qwen3_moe", "--bias-update-rate", "0.1"], "a qwen3_moe model's router has no selection bias"),
    (["--hf-path", "/nonexistent"], "--hf-path /nonexistent: no config.json there"),
])
def test_hf_flags_the_run_cannot_use_are_rejected_by_name(flags, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_flags(build_parser().parse_args(flags), 2, given_flags(flags))


@needs_hf
def test_hf_path_rejects_size_flags_and_deepspeed_without_zero_1_or_2(hf_runs, tmp_path: Path) -> None:
    saved = str(hf_runs("mixtral")[0] / "hf")
    flags = ["--hf-path", saved, "--d-model", "32"]
    with pytest.raises(ValueError, match=re.escape(f"--d-model 32 does not apply to --hf-path {saved}")):
        check_flags(build_parser().parse_args(flags), 2, given_flags(flags))
    stage3 = tmp_path / "stage3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    flags = ["--hf-path", saved, "--deepspeed-config", str(stage3)]
    with pytest.raises(ValueError, match="zero_optimization.stage 3 with a Hugging Face model"):
        check_flags(build_parser().parse_args(flags), 2, given_flags(flags))
    check_flags(build_parser().parse_args(["--hf-path", saved]), 2, frozenset({"hf_path"}))  # this one passes


def test_resume_from_weights_only_warns_and_a_checkpoint_without_step_is_named(tmp_path: Path, capsys) -> None:
    from expert_parallel import MoEConfig, MoELayer
    from expert_parallel.checkpoint import mark_latest, save_checkpoint
    from expert_parallel.comm import expert_groups
    from launch.backends import TorchBackend

    args = build_parser().parse_args(["--out", str(tmp_path), "--batch-size", "4"])
    saved = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    save_checkpoint(tmp_path / "checkpoint" / "converted", saved, extra={"step": 7})  # weights only
    mark_latest(tmp_path / "checkpoint", "converted")
    backend = TorchBackend(MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4)), args, expert_groups(1), 0, 1, 1)
    assert backend.load() == 7
    assert "holds no optimizer state; AdamW's moments start from zero" in capsys.readouterr().err
    assert torch.equal(backend.model.experts.w1, saved.experts.w1)
    save_checkpoint(tmp_path / "checkpoint" / "nostep", saved)
    mark_latest(tmp_path / "checkpoint", "nostep")
    with pytest.raises(ValueError, match=r"records no step \(extra=\[\]\)"):
        backend.load()
