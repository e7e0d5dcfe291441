"""The Turing path: an emulated compute capability takes a Turing GPU's decisions; the fast path's kernel setting;
``tools/turing_path.py``'s summary (on/off against seed noise)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from utils import device, provenance, training
from utils.paths import CONFIG_FILE, HISTORY_FILE, REPO_ROOT
from utils.speed.fastpath import FastPathError, FastPathOptions, liger_available, varlen_supported
from utils.training.model import check_attention_implementation

sys.path.insert(0, str(REPO_ROOT / "tools"))
import turing_path  # noqa: E402

ENV = device.EMULATE_CAPABILITY_ENV


@pytest.fixture
def h200(monkeypatch):
    """A CPU machine that says it has an H200 (capability 9.0), without emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.delenv(ENV, raising=False)
    liger_available.cache_clear()  # its answer depends on torch.cuda.is_available(), patched here
    yield monkeypatch
    liger_available.cache_clear()


def test_capability_is_the_gpus_own_without_emulation(h200):
    assert device.compute_capability() == (9, 0) and device.emulated_capability() is None
    assert device.gpu_supports_bf16("cuda:0") and device.pick_compute_dtype("cuda:0") == torch.bfloat16


def test_emulated_turing_takes_turing_decisions(h200):
    h200.setenv(ENV, "7.5")
    assert device.compute_capability("cuda:0") == (7, 5) and device.real_capability("cuda:0") == (9, 0)
    assert not device.gpu_supports_bf16("cuda:0")
    assert device.pick_compute_dtype("cuda:0") == torch.float16  # compute dtype auto → fp16
    # FlashAttention's varlen kernel needs Ampere: the fast path falls back to SDPA
    assert not varlen_supported(torch.device("cuda", 0), torch.float16)


def test_emulated_turing_attention_skips_flash_and_cudnn_kernels(h200):
    """SDPA's FlashAttention and cuDNN backends need Ampere: an emulated Turing run switches them off."""
    backends = torch.backends.cuda
    before = backends.flash_sdp_enabled(), backends.cudnn_sdp_enabled()
    try:
        assert device.restrict_sdpa_to_capability() == []  # the GPU's own capability: nothing changes
        assert (backends.flash_sdp_enabled(), backends.cudnn_sdp_enabled()) == before
        h200.setenv(ENV, "7.5")
        assert device.restrict_sdpa_to_capability() == ["flash", "cudnn"]
        assert not backends.flash_sdp_enabled() and not backends.cudnn_sdp_enabled()
        assert backends.mem_efficient_sdp_enabled()  # what a Turing GPU runs
    finally:
        backends.enable_flash_sdp(before[0])
        backends.enable_cudnn_sdp(before[1])


def test_flash_attention_2_is_refused_on_an_emulated_turing(h200, tmp_path):
    h200.setenv(ENV, "7.5")
    plan = training.plan_training(training.TrainingSettings(output_dir=str(tmp_path)), "cuda:0")
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"))
    assert check_attention_implementation(model, plan) == "sdpa"
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(training.TrainingConfigError, match="flash_attention_2.*has 7.5.*attn_implementation='sdpa'"):
        check_attention_implementation(model, plan)


def test_emulating_a_newer_gpu_or_a_malformed_value_is_one_clear_error(h200):
    h200.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a real RTX 2070 SUPER
    h200.setenv(ENV, "8.0")
    with pytest.raises(device.CapabilityEmulationError, match=r"8\.0 is above .* \(7\.5\).*or unset it"):
        device.compute_capability()
    h200.setenv(ENV, "sm75")
    with pytest.raises(device.CapabilityEmulationError, match="MAJOR.MINOR, e.g. QLORA_EMULATE_CAPABILITY=7.5"):
        device.compute_capability()


def test_training_plan_under_emulation(h200, tmp_path):
    """auto → fp16 and a note that names the emulation; bf16 refused with the variable in the message."""
    h200.setenv(ENV, "7.5")
    plan = training.plan_training(training.TrainingSettings(output_dir=str(tmp_path / "auto")), "cuda:0")
    assert plan.compute_dtype == "fp16" and plan.fp16 and not plan.bf16
    assert (plan.compute_capability, plan.emulated_from) == ("7.5", "9.0")
    assert any("NVIDIA H200" in note and "fp16 en lugar de bf16" in note for note in plan.notes)
    with pytest.raises(training.TrainingConfigError, match="needs compute capability 8.0.*QLORA_EMULATE_CAPABILITY"):
        training.plan_training(training.TrainingSettings(compute_dtype="bf16", output_dir=str(tmp_path / "b")),
                               "cuda:0")
    h200.setenv(ENV, "9.5")
    with pytest.raises(training.TrainingConfigError, match="only an older GPU can be emulated"):
        training.plan_training(training.TrainingSettings(output_dir=str(tmp_path / "c")), "cuda:0")
    h200.delenv(ENV)
    plan = training.plan_training(training.TrainingSettings(output_dir=str(tmp_path / "real")), "cuda:0")
    assert plan.compute_dtype == "bf16" and (plan.compute_capability, plan.emulated_from) == ("9.0", None)


def test_device_info_records_the_emulated_capability(h200):
    h200.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"total_memory": 2**30}))
    assert "emulated_capability" not in provenance.device_info()
    h200.setenv(ENV, "7.5")
    info = provenance.device_info()
    assert info["compute_capability"] == "9.0" and info["emulated_capability"] == "7.5"


def test_fast_path_kernels_setting(tmp_path):
    assert training.TrainingSettings().fast_path_kernels == "auto"
    with pytest.raises(training.TrainingConfigError, match="fast_path_kernels='triton': use one of auto, liger, torch"):
        training.plan_training(training.TrainingSettings(fast_path_kernels="triton", output_dir=str(tmp_path)), "cpu")
    # Liger's Triton kernels cannot run on a CPU: refused before the model loads, with the way out
    with pytest.raises(training.TrainingConfigError, match="fast_path_kernels='liger' needs a CUDA GPU.*'torch'"):
        training.plan_training(training.TrainingSettings(fast_path="on", fast_path_kernels="liger",
                                                         output_dir=str(tmp_path)), "cpu")
    plan = training.plan_training(training.TrainingSettings(fast_path="on", fast_path_kernels="torch",
                                                            output_dir=str(tmp_path)), "cpu")
    assert plan.fast_path
    assert FastPathOptions(kernels="torch").kernels == "torch"
    with pytest.raises(FastPathError, match="kernels='triton'"):
        FastPathOptions(kernels="triton")


def test_fast_path_kernels_reaches_the_command_line_and_the_profile(tmp_path):
    parsed = vars(training.build_parser().parse_args(["--fast-path-kernels", "torch"]))
    assert parsed["fast_path_kernels"] == "torch"
    settings = training.profile_settings("smoke", fast_path_kernels="torch", output_dir=str(tmp_path))
    assert settings.fast_path_kernels == "torch"


# --------------------------------------------------------------------------------------------
# tools/turing_path.py: the summary from run folders (fabricated here; the slow test makes real ones)
# --------------------------------------------------------------------------------------------


def _fake_run(folder: Path, fast_path: str, seed: int, losses: list[float], evals: list[float],
              kernels: str = "auto") -> None:
    """A finished run folder as ``python -m utils.training`` writes it (config, run record, log history)."""
    folder.mkdir(parents=True)
    parameters = {"profile": "thesis", "model_name": "embedded", "fast_path": fast_path, "seed": seed,
                  "fast_path_kernels": kernels, "max_steps": len(losses)}
    plan = {"device": "cuda:0", "compute_dtype": "fp16", "fast_path": fast_path == "on",
            "compute_capability": "7.5", "emulated_from": "9.0", "attn_implementation": "sdpa",
            "fast_path_resolved": {"kernels": kernels, "attention": "sdpa"} if fast_path == "on" else None}
    config = {"parameters": parameters, "plan": plan, "device_name": "NVIDIA H200", "commit": "abc",
              "command": "python -m utils.training", "date": "2026-12-02T14:40:00+00:00", "versions": {}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / "04_run.json").write_text(json.dumps({"wall_time_s": 12.5, "training": {"global_step": len(losses)}}))
    rows = ["step,loss,eval_loss"] + [f"{i + 1},{loss}," for i, loss in enumerate(losses)]
    rows += [f"{(i + 1) * (len(losses) // len(evals))},,{e}" for i, e in enumerate(evals)]
    (folder / HISTORY_FILE).write_text("\n".join(rows) + "\n")


def test_summary_compares_paths_against_seed_noise(tmp_path):
    work = tmp_path / "turing"
    _fake_run(work / "on_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.30])
    _fake_run(work / "off_s42", "off", 42, [2.0, 1.5, 1.2, 1.1], [1.50, 1.32])  # final gap 0.02, step gap 0.025
    _fake_run(work / "on_s43", "on", 43, [2.2, 1.7, 1.2, 1.0], [1.55, 1.40])  # seed gap 0.10, step gap 0.10
    _fake_run(work / "off_s43", "off", 43, [2.1, 1.6, 1.3, 1.1], [1.52, 1.35])
    _fake_run(work / "on_torch_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.30], kernels="torch")
    _fake_run(work / "on_liger_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.60], kernels="liger")  # off by 0.3
    processes = {name: {"wall_s": 20.0} for name in turing_path.RUNS}
    out = turing_path.summarize_turing(work, tmp_path / "gpu" / "04_turing_path.json", processes, "thesis", "7.5",
                                       False, {})
    summary = json.loads(out.read_text())
    assert summary["emulated_capability"] == "7.5" and summary["steps"] == 4 and set(summary["runs"]) == set(
        turing_path.RUNS)
    run = summary["runs"]["on_torch_s42"]
    assert run["settings"]["fast_path_kernels"] == "torch" and run["fast_path_resolved"]["attention"] == "sdpa"
    assert run["train_losses"] == [[1, 2.0], [2, 1.5], [3, 1.2], [4, 1.0]] and run["eval_losses"][-1] == [4, 1.3]
    assert run["final_eval_loss"] == 1.3 and run["wall_s"] == 20.0 and run["emulated_from"] == "9.0"
    gaps = summary["comparison"]["gaps"]
    assert gaps["on_vs_off_s42"]["final_eval_loss_gap"] == pytest.approx(0.02)
    assert gaps["on_vs_off_s42"]["mean_step_train_loss_gap"] == pytest.approx(0.025)
    assert gaps["seed42_vs_seed43_fast_path_on"]["final_eval_loss_gap"] == pytest.approx(0.10)
    assert gaps["seed42_vs_seed43_fast_path_on"]["steps_compared"] == 4
    verdicts = summary["comparison"]["verdicts"]
    assert verdicts["fast_path_on_vs_off"]["agree_within_seed_noise"] is True
    assert verdicts["kernels_torch_vs_auto"]["agree_within_seed_noise"] is True
    liger = verdicts["kernels_liger_vs_auto"]
    assert liger["final_eval_loss"] is False and liger["agree_within_seed_noise"] is False


def test_summary_without_a_seed_pair_gives_no_verdict(tmp_path):
    work = tmp_path / "turing"
    _fake_run(work / "on_s42", "on", 42, [2.0, 1.5], [1.4])
    _fake_run(work / "off_s42", "off", 42, [2.0, 1.6], [1.5])
    # only on_s42 ran in this invocation (--only): off_s42's finished folder is summarised as it is
    out = turing_path.summarize_turing(work, tmp_path / "t.json", {"on_s42": {"wall_s": 3.0}}, "thesis", None,
                                       True, {})
    summary = json.loads(out.read_text())
    assert set(summary["runs"]) == {"on_s42", "off_s42"} and summary["runs"]["off_s42"]["wall_s"] is None
    verdict = summary["comparison"]["verdicts"]["fast_path_on_vs_off"]
    assert verdict["agree_within_seed_noise"] is None  # no seed-to-seed gap to compare with


def test_stopped_runs_are_compared_over_the_steps_every_run_logged(tmp_path):
    work = tmp_path / "turing"
    _fake_run(work / "on_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.30])
    _fake_run(work / "on_s43", "on", 43, [2.4, 1.9, 1.2, 1.0], [1.55, 1.40])
    _fake_run(work / "off_s42", "off", 42, [2.1, 1.6], [1.50])  # stopped after step 2: no run record
    (work / "off_s42" / "04_run.json").unlink()
    (work / "on_s42" / "04_run.json").write_text(json.dumps({
        "wall_time_s": 12.5, "training": {"global_step": 4}, "started_at": "2026-12-02T14:03:32+00:00",
        "device": "NVIDIA H200", "commit": "b3234e8", "versions": {"torch": "2.11.0"}, "compute_capability": "9.0"}))
    out = turing_path.summarize_turing(work, tmp_path / "t.json", {}, "gpu", "7.5", False, {},
                                       provenance_from_runs=True)
    summary = json.loads(out.read_text())
    # summarised on this CPU, but the provenance is the GPU run's own
    assert summary["device"] == "NVIDIA H200" and summary["date"] == "2026-12-02T14:03:32+00:00"
    assert summary["commit"] == "b3234e8" and summary["summarized_at"]
    assert set(summary["runs"]) == {"on_s42", "on_s43"} and summary["partial_runs"]["off_s42"]["stopped_at_step"] == 2
    early = summary["early_steps_comparison"]
    assert early["steps"] == 2
    assert early["gaps"]["on_vs_off_s42"]["mean_step_train_loss_gap"] == pytest.approx(0.1)
    assert early["gaps"]["seed42_vs_seed43_fast_path_on"]["mean_step_train_loss_gap"] == pytest.approx(0.4)
    assert early["verdicts"]["fast_path_on_vs_off"]["mean_step_train_loss"] is True
    assert early["verdicts"]["fast_path_on_vs_off"]["agree_within_seed_noise"] is None  # no validation loss there


def test_runs_and_commands():
    runs = turing_path.selected_runs("")
    assert {(r.fast_path, r.seed) for r in runs} >= {("on", 42), ("off", 42), ("on", 43), ("off", 43)}
    torch_run = turing_path.RUNS["on_torch_s42"]
    command = turing_path.run_command(torch_run, Path("/w"), "thesis", smoke=False)
    assert command[1:3] == ["-m", "utils.training"]
    text = " ".join(command)
    assert "--fast-path on --fast-path-kernels torch --seed 42" in text and "--model embedded" in text
    assert "--max-steps 300 --eval-steps 100 --eval-limit 0" in text and text.endswith("--output-dir /w/on_torch_s42")
    assert "--fast-path-kernels" not in " ".join(turing_path.run_command(turing_path.RUNS["off_s43"], Path("/w"),
                                                                         "thesis", smoke=False))
    env = turing_path.run_env("7.5", smoke=False)
    assert env[ENV] == "7.5" and ENV not in turing_path.run_env(None, smoke=True)
    with pytest.raises(SystemExit, match="unknown runs"):
        turing_path.selected_runs("on_s42,fast")


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """Two real 2-step runs on the CPU (fast path on and off at seed 42), then the summary (CI's budget: two, not
    six; the seed-noise verdicts are tested on fabricated folders above)."""
    out = tmp_path / "turing.json"
    done = subprocess.run(
        [sys.executable, "tools/turing_path.py", "--smoke", "--only", "on_s42,off_s42",
         "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["smoke"] and summary["emulated_capability"] is None
    assert summary["command"].startswith("python tools/turing_path.py --smoke")
    on = summary["runs"]["on_s42"]
    assert on["fast_path_resolved"]["kernels"] == "torch" and on["fast_path_resolved"]["attention"] == "sdpa"
    assert summary["runs"]["off_s42"]["fast_path_resolved"] is None
    assert len(on["train_losses"]) == 2 and on["final_eval_loss"] is not None
    gap = summary["comparison"]["gaps"]["on_vs_off_s42"]
    assert gap["steps_compared"] == 2 and gap["final_eval_loss_gap"] < 0.05  # same maths, same seed
    # no second seed ran, so there is no noise to compare with: the verdict says "unknown", not "agree"
    assert summary["comparison"]["verdicts"]["fast_path_on_vs_off"]["agree_within_seed_noise"] is None


def test_summary_carries_over_runs_of_an_earlier_summary(tmp_path):
    # First machine: the fast path's runs finished, the PyTorch path's did not (their folders are gone with it).
    first, second = tmp_path / "first", tmp_path / "second"
    out = tmp_path / "gpu" / "04_turing_path.json"
    _fake_run(first / "on_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.30])
    _fake_run(first / "on_s43", "on", 43, [2.2, 1.7, 1.2, 1.0], [1.55, 1.40])
    turing_path.summarize_turing(first, out, {"on_s42": {"wall_s": 5.0}, "on_s43": {"wall_s": 5.0}}, "gpu", "7.5",
                                 False, {})
    # Second machine, --only off_s42,off_s43: the earlier runs come from the summary, the new ones from folders.
    _fake_run(second / "off_s42", "off", 42, [2.0, 1.5, 1.2, 1.1], [1.50, 1.32])
    _fake_run(second / "off_s43", "off", 43, [2.1, 1.6, 1.3, 1.1], [1.52, 1.35])
    turing_path.summarize_turing(second, out, {"off_s42": {"wall_s": 9.0}, "off_s43": {"wall_s": 9.0}}, "gpu",
                                 "7.5", False, {})
    summary = json.loads(out.read_text())
    assert set(summary["runs"]) == {"on_s42", "off_s42", "on_s43", "off_s43"}
    assert set(summary["carried_over"]) == {"on_s42", "on_s43"} and summary["runs"]["on_s42"]["wall_s"] == 5.0
    assert summary["runs"]["off_s42"]["final_eval_loss"] == 1.32 and "carried_from" not in summary["runs"]["off_s42"]
    assert summary["comparison"]["gaps"]["on_vs_off_s42"]["final_eval_loss_gap"] == pytest.approx(0.02)
    assert summary["comparison"]["verdicts"]["fast_path_on_vs_off"]["agree_within_seed_noise"] is True
    # A rerun replaces the carried record: a third summary with on_s42's folder takes the folder's numbers.
    _fake_run(second / "on_s42", "on", 42, [2.0, 1.5, 1.2, 1.0], [1.50, 1.31])
    turing_path.summarize_turing(second, out, {"on_s42": {"wall_s": 4.0}}, "gpu", "7.5", False, {})
    summary = json.loads(out.read_text())
    assert summary["runs"]["on_s42"]["final_eval_loss"] == 1.31 and set(summary["carried_over"]) == {"on_s43"}
