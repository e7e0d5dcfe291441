"""Kill a training run after a checkpoint, resume it, and get the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from utils import training
from utils.inference import load_trained
from utils.paths import ADAPTER_DIR, CHECKPOINTS_DIR, HISTORY_FILE, REPO_ROOT

from trainers import smoke_trainer  # tests/trainers.py

MAX_STEPS = 4  # checkpoints at steps 2 and 4: killed after the first, resumed for the last two steps
ARGS = [
    "--profile", "smoke", "--max-steps", str(MAX_STEPS), "--save-steps", "2", "--save-total-limit", "5",
    "--logging-steps", "1", "--eval-steps", "100", "--no-eval-on-start", "--train-limit", "8",
    "--eval-limit", "2", "--warmup-steps", "1", "--gradient-accumulation-steps", "1",
]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "utils.training", *ARGS, "--output-dir", str(out), *extra]


def _env() -> dict[str, str]:
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait; on a CPU shared with other jobs
    # spinning threads made these runs several times slower.
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(out, *extra), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run_and_kill_after_first_checkpoint(out: Path) -> int:
    """Start a run, SIGKILL it once a complete checkpoint exists; return that checkpoint's step."""
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(_command(out), cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = training.find_last_checkpoint(out / CHECKPOINTS_DIR)
            if last is not None:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    return int(last.name.split("-")[1])


def _losses(out: Path) -> pd.Series:
    history = pd.read_csv(out / HISTORY_FILE)
    rows = history.dropna(subset=["loss"])
    assert rows["step"].is_unique, "a step was logged twice"
    return rows.set_index("step")["loss"]


@pytest.mark.slow
def test_killed_run_resumes_where_the_uninterrupted_run_would_be(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # the uninterrupted reference through the command's entry point in this process (a third process start-up
    # adds nothing: the run that is killed and the resumed one are the command in its own process)
    assert training.main([*ARGS, "--output-dir", str(straight)]) == 0

    killed_at = _run_and_kill_after_first_checkpoint(broken)
    assert killed_at < MAX_STEPS
    assert not (broken / ADAPTER_DIR).exists()  # it really died before the end

    resumed = _run(broken, "--resume")
    last = training.find_last_checkpoint(broken / CHECKPOINTS_DIR)
    assert "se continúa desde checkpoint-" in resumed.stdout
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS and last.name == f"checkpoint-{MAX_STEPS}"

    # every step logged once, and the history before the kill survived
    a, b = _losses(straight), _losses(broken)
    assert list(b.index) == list(range(1, MAX_STEPS + 1))
    assert b[MAX_STEPS] == pytest.approx(a[MAX_STEPS], rel=1e-3)  # the resumed run's loss at the last step
    assert b.loc[:killed_at].to_numpy() == pytest.approx(a.loc[:killed_at].to_numpy(), rel=1e-3)

    # the scheduler and optimizer states were restored, not restarted
    ref = straight / CHECKPOINTS_DIR / f"checkpoint-{MAX_STEPS}"
    sched_a = torch.load(ref / "scheduler.pt", weights_only=False)
    sched_b = torch.load(last / "scheduler.pt", weights_only=False)
    assert sched_b["last_epoch"] == sched_a["last_epoch"] == MAX_STEPS
    assert sched_b["_last_lr"] == pytest.approx(sched_a["_last_lr"])
    opt_a = torch.load(ref / "optimizer.pt", weights_only=False)["state"]
    opt_b = torch.load(last / "optimizer.pt", weights_only=False)["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        assert float(opt_b[key]["step"]) == float(opt_a[key]["step"]) == MAX_STEPS
        torch.testing.assert_close(opt_b[key]["exp_avg_sq"], opt_a[key]["exp_avg_sq"], rtol=1e-3, atol=1e-9)

    # the adapter the evaluation loads is the one an uninterrupted run produces
    model_a, _ = load_trained(straight, device="cpu")
    model_b, tokenizer = load_trained(broken, device="cpu")
    weights_a = {k: v for k, v in model_a.named_parameters() if "lora_" in k}
    weights_b = {k: v for k, v in model_b.named_parameters() if "lora_" in k}
    assert weights_a and weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-3, atol=1e-6)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    run = json.loads((broken / training.RUN_FILE).read_text())
    assert run["training"]["resumed_from"].endswith(f"checkpoint-{killed_at}")


def test_a_resumed_run_keeps_the_adapter_dtype(tmp_path):
    """Resuming reloads the adapter through PEFT's ``load_adapter``, which upcasts bf16 weights to fp32; the run
    goes on in the dtype it was built with (TRL's bf16 for a 4-bit model), with the checkpoint's values."""
    def bf16_trainer(max_steps):
        trainer, *_ = smoke_trainer(tmp_path, max_steps=max_steps, save_steps=1, train_limit=2, eval_limit=1,
                                    max_seq_length=256, gradient_accumulation_steps=1, eval_on_start=False)
        training.recast_trainable_parameters(trainer.model, torch.bfloat16)  # as TRL leaves a 4-bit model
        training.keep_trainable_dtypes(trainer)  # records bf16 (called again: no second wrapper)
        return trainer

    first = bf16_trainer(max_steps=2)
    first.train()
    checkpoint = tmp_path / CHECKPOINTS_DIR / "checkpoint-2"
    assert checkpoint.is_dir()
    saved = {name: param.detach().clone() for name, param in first.model.named_parameters() if param.requires_grad}

    resumed = bf16_trainer(max_steps=3)
    loaded = {}
    create = resumed.create_optimizer

    def spy(*args, **kwargs):  # the weights as the optimiser first sees them
        optimizer = create(*args, **kwargs)
        loaded.update({name: param.detach().clone()
                       for name, param in resumed.model.named_parameters() if param.requires_grad})
        return optimizer

    resumed.create_optimizer = spy
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert set(loaded) == set(saved)
    assert {param.dtype for param in loaded.values()} == {torch.bfloat16}
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    assert training.trainable_dtypes(resumed.model) == {"bf16": sum(p.numel() for p in saved.values())}
