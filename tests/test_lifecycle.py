"""Nothing a run wrote is lost: a rerun after a crash resumes or stops, a finished run is kept in ``previous/``,
one training at a time writes a folder, and a folder that cannot be written is one line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils import training
from utils.paths import ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE, HISTORY_FILE, REPO_ROOT

SMOKE = dict(profile="smoke", model_name="embedded", train_limit=4, eval_limit=2, max_steps=4, warmup_steps=1,
             gradient_checkpointing=False, eval_on_start=False, eval_steps=100, logging_steps=1, save_steps=2)


class Stop(Exception):
    """Raised by ``FakeTrainer.train``: what the folder held when training would have started."""


class FakeTrainer:
    """What ``run_training`` needs of a trainer; ``train`` records the folder and raises ``error``."""

    args = type("Args", (), {"to_dict": lambda self: {}})()

    def __init__(self, out: Path, error: BaseException | None = None):
        self.out, self.error, self.seen = out, error or Stop(), None

    def train(self, resume_from_checkpoint=None):
        self.seen = sorted(p.name for p in self.out.iterdir())
        self.resumed_from = resume_from_checkpoint
        raise self.error


def _settings(out: Path, **change) -> training.TrainingSettings:
    return training.TrainingSettings(**{**SMOKE, "output_dir": str(out), **change})


def _crashed_run(out: Path, **change) -> Path:
    """The folder a run killed after checkpoint-2 leaves (checkpoint-4 cut off while being written)."""
    settings = _settings(out, **change)
    training.write_config(settings, training.plan_training(settings, "cpu"))
    complete = out / CHECKPOINTS_DIR / "checkpoint-2"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (complete / "adapter_model.safetensors").write_bytes(b"weights at step 2")
    (out / CHECKPOINTS_DIR / "checkpoint-4").mkdir()
    return complete


def _finished_run(out: Path) -> dict[str, bytes]:
    """A finished run's files (config, adapter, checkpoints, history, record); returns {relative path: bytes}."""
    settings = _settings(out)
    training.write_config(settings, training.plan_training(settings, "cpu"))
    files = {f"{ADAPTER_DIR}/adapter_model.safetensors": b"final adapter",
             f"{CHECKPOINTS_DIR}/checkpoint-4/trainer_state.json": b'{"global_step": 4}',
             HISTORY_FILE: b"step,loss\n1,2.0\n", "04_run.json": b"{}", "04_extra_table.csv": b"a\n"}
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    files[CONFIG_FILE] = (out / CONFIG_FILE).read_bytes()
    return files


# --------------------------------------------------------------------------------------------
# A rerun after a crash
# --------------------------------------------------------------------------------------------


def test_a_rerun_after_a_crash_continues_from_the_last_complete_checkpoint(tmp_path):
    complete = _crashed_run(tmp_path)
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path)})  # resume left at its default
    assert settings.resume == "auto"
    plan = training.plan_training(settings, "cpu")
    assert plan.resume_from == str(complete) and plan.previous_run is None
    assert any("se continúa desde checkpoint-2" in note for note in plan.notes)
    trainer = FakeTrainer(tmp_path)
    with pytest.raises(Stop):
        training.run_training(trainer, settings, plan)
    assert trainer.resumed_from == str(complete) and (complete / "adapter_model.safetensors").is_file()


def test_resume_false_with_checkpoints_of_an_unfinished_run_stops_and_keeps_them(tmp_path):
    complete = _crashed_run(tmp_path)
    with pytest.raises(training.TrainingConfigError) as info:
        training.plan_training(_settings(tmp_path, resume=False), "cpu")
    message = str(info.value)
    for part in ("resume=False", "checkpoint-2", "resume='auto'", "new output_dir", f"mv {tmp_path}"):
        assert part in message, message
    # the same when the checkpoints appear after the plan: run_training checks again and deletes nothing
    fresh = tmp_path / "fresh"
    settings = _settings(fresh, resume=False)
    plan = training.plan_training(settings, "cpu")
    _crashed_run(fresh)
    trainer = FakeTrainer(fresh)
    with pytest.raises(training.TrainingConfigError, match="unfinished run"):
        training.run_training(trainer, settings, plan)
    assert trainer.seen is None  # never trained
    assert (complete / "trainer_state.json").is_file() and (fresh / CHECKPOINTS_DIR / "checkpoint-2").is_dir()
    assert training.read_lock(fresh) is None  # released on the error


def test_auto_with_other_settings_names_them_and_the_two_ways_out(tmp_path):
    _crashed_run(tmp_path)
    with pytest.raises(training.TrainingConfigError) as info:
        training.plan_training(_settings(tmp_path, learning_rate=3e-4, lora_r=8), "cpu")
    message = str(info.value)
    for part in ("learning_rate: checkpoint 0.0001 vs now 0.0003", "lora_r: checkpoint 32 vs now 8",
                 "resume=False with a new output_dir", f"mv {tmp_path}"):
        assert part in message, message
    assert (tmp_path / CHECKPOINTS_DIR / "checkpoint-2" / "trainer_state.json").is_file()


def test_only_cut_off_checkpoints_stop_rather_than_rotate_away(tmp_path):
    (tmp_path / CHECKPOINTS_DIR / "checkpoint-2").mkdir(parents=True)  # killed while writing the first one
    with pytest.raises(training.TrainingConfigError, match="nothing to resume"):
        training.plan_training(_settings(tmp_path), "cpu")
    assert (tmp_path / CHECKPOINTS_DIR / "checkpoint-2").is_dir()


# --------------------------------------------------------------------------------------------
# A finished run in the folder
# --------------------------------------------------------------------------------------------


def test_a_new_run_moves_the_finished_run_to_previous_first(tmp_path, capsys):
    files = _finished_run(tmp_path)
    (tmp_path / "04_training.ipynb").write_text("{}")  # the executed notebook papermill is writing now
    (tmp_path / "04_kernel.log").write_text("this run's kernel")  # and the runner's log of its kernel
    (tmp_path / "01_run.json").write_text("{}")  # another notebook's record
    settings = _settings(tmp_path)
    plan = training.plan_training(settings, "cpu")
    assert plan.resume_from is None and "previous" in plan.previous_run
    trainer = FakeTrainer(tmp_path)
    with pytest.raises(Stop):
        training.run_training(trainer, settings, plan)
    (moved,) = (tmp_path / training.PREVIOUS_DIR).iterdir()
    config = json.loads(files[CONFIG_FILE])
    assert moved.name == config["date"][:19].replace("-", "").replace(":", "") + "Z"
    for name, data in files.items():
        assert (moved / name).read_bytes() == data, name  # moved whole, byte for byte
    assert f"ahora está en {moved}" in capsys.readouterr().out
    # when training starts: the new config and the lock, no old checkpoint, adapter or history
    assert trainer.seen == sorted(["01_run.json", "04_kernel.log", "04_training.ipynb", CONFIG_FILE,
                                   training.LOCK_FILE, training.PREVIOUS_DIR])
    assert (tmp_path / "04_kernel.log").read_text() == "this run's kernel"
    assert training.read_lock(tmp_path) is None


def test_resume_true_continues_a_finished_run_in_place(tmp_path):
    _finished_run(tmp_path)
    plan = training.plan_training(_settings(tmp_path, resume=True), "cpu")
    assert plan.resume_from.endswith("checkpoint-4") and plan.previous_run is None


def _train_cli(out: Path, capsys) -> str:
    """One step of the smoke run through the entry point of ``python -m utils.training``, in this process (the
    command itself runs in its own process in test_resume.py); returns what it printed."""
    args = ["--profile", "smoke", "--max-steps", "1", "--warmup-steps", "0", "--save-steps", "1", "--train-limit", "2",
            "--eval-limit", "1", "--eval-steps", "100", "--no-eval-on-start", "--output-dir", str(out)]
    capsys.readouterr()
    code = training.main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    return printed.out


@pytest.mark.slow
def test_training_twice_into_one_folder_keeps_the_first_run(tmp_path, capsys):
    _train_cli(tmp_path, capsys)
    first = (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    first_config = (tmp_path / CONFIG_FILE).read_bytes()
    second = _train_cli(tmp_path, capsys)
    (moved,) = (tmp_path / training.PREVIOUS_DIR).iterdir()
    assert f"ahora está en {moved}" in second and "TRAINING OK" in second
    assert (moved / ADAPTER_DIR / "adapter_model.safetensors").read_bytes() == first
    assert (moved / CONFIG_FILE).read_bytes() == first_config
    assert (moved / CHECKPOINTS_DIR / "checkpoint-1" / "trainer_state.json").is_file()
    assert (moved / training.RUN_FILE).is_file() and (tmp_path / training.RUN_FILE).is_file()
    run = json.loads((tmp_path / training.RUN_FILE).read_text())
    assert run["training"]["global_step"] == 1 and run["training"]["resumed_from"] is None  # trained again
    assert (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert training.read_lock(tmp_path) is None


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


def _lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started_at": "2026-01-01T00:00:00+00:00"}
    (out / training.LOCK_FILE).write_text(json.dumps(record))


def test_a_second_training_into_a_locked_folder_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, other.pid)
        with pytest.raises(training.TrainingConfigError) as info:
            training.plan_training(_settings(tmp_path), "cpu")
        message = str(info.value)
        assert "another training" in message and f"pid {other.pid}" in message and "output_dir" in message
        with pytest.raises(training.TrainingConfigError, match="another training"):
            training.acquire_lock(tmp_path)
        training.release_lock(tmp_path)  # never removes another process's lock
        assert training.read_lock(tmp_path)["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
    _lock(tmp_path, 1, host="some-other-host")  # its process cannot be checked from here
    with pytest.raises(training.TrainingConfigError, match="some-other-host"):
        training.plan_training(_settings(tmp_path), "cpu")


def test_a_stale_lock_is_taken_over_with_a_warning_and_released(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock(tmp_path, gone.pid)
    settings = _settings(tmp_path)
    plan = training.plan_training(settings, "cpu")
    trainer = FakeTrainer(tmp_path)
    with pytest.raises(Stop):
        training.run_training(trainer, settings, plan)
    assert training.LOCK_FILE in trainer.seen
    err = capsys.readouterr().err
    assert err.startswith("warning: taking over the stale lock") and f"pid {gone.pid}" in err
    assert training.read_lock(tmp_path) is None  # released, also on the error


# --------------------------------------------------------------------------------------------
# A folder that cannot be written
# --------------------------------------------------------------------------------------------


def _read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only; root writes anyway, so there the writes are made to fail as they would."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder / CONFIG_FILE))

        monkeypatch.setattr("utils.training.lifecycle.os.access", lambda path, mode: Path(path) != folder)
        monkeypatch.setattr("utils.training.run.save_json", denied)
        monkeypatch.setattr("utils.training.lifecycle.os.open", denied)


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    settings = _settings(folder)
    plan = training.plan_training(settings, "cpu")
    _read_only(folder, monkeypatch)
    try:
        with pytest.raises(training.TrainingOutputError) as info:
            training.plan_training(settings, "cpu")
        assert str(folder) in str(info.value) and "permission denied" in str(info.value)
        with pytest.raises(training.TrainingOutputError) as info:
            training.run_training(FakeTrainer(folder), settings, plan)
        message = str(info.value)
        assert str(folder) in message and "permission denied" in message and "\n" not in message
        code = training.main(["--profile", "smoke", "--output-dir", str(folder)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: cannot write") and err.count("\n") == 1
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "04_checkpoints/checkpoint-2/optimizer.pt"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_checkpoints(tmp_path, error):
    settings = _settings(tmp_path)
    plan = training.plan_training(settings, "cpu")
    with pytest.raises(training.TrainingOutputError) as info:
        training.run_training(FakeTrainer(tmp_path, error), settings, plan)
    message = str(info.value)
    assert str(tmp_path) in message and "no space left on device" in message and "\n" not in message
    assert "checkpoints written so far are kept" in message
    assert training.read_lock(tmp_path) is None


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_the_command_line_sets_omp_wait_policy_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY when torch loads it; PASSIVE shows as a spin count of 0."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    done = subprocess.run([sys.executable, "-m", "utils.training", "--help"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GOMP_SPINCOUNT = '0'" in done.stderr, done.stderr[-2000:]


def test_a_max_seq_length_that_empties_the_training_set_is_one_message(tmp_path, capsys):
    code = training.main(["--profile", "smoke", "--max-seq-length", "8", "--train-limit", "4", "--eval-limit", "2",
                          "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "max_seq_length=8" in err
    assert "num_samples" not in err and "Traceback" not in err
