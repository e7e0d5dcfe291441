"""Published GPU runs: the runner's --run-name / --set / --publish, and notebooks 04-05's tables and figures of them.

Every run here is fabricated in a temporary folder (small JSON/CSV files as the notebooks write them), so the
publishing, the reading back and the verdicts are tested for real on a CPU before any GPU campaign.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from utils import config, publishing, runner
from utils.evaluation import runs as gpu
from utils.paths import PARAMS_DIR, RESULTS_DIR
from utils.plotting import check_print_standard, set_figure_context
from utils.reports import gpu_runs


def metric_rows(recall_delta: float, refusal: float, wrongful: float) -> list[dict]:
    """A 05_metrics.json summary: base and tuned on the target metrics, and the tuned − base recall."""
    def row(model, metric, value, width=0.1):
        return {"model": model, "metric": metric, "value": value, "low": value - width, "high": value + width, "n": 40}
    return [row("base", "keyword_recall", 0.2), row("tuned", "keyword_recall", 0.2 + recall_delta),
            row("delta", "keyword_recall", recall_delta, 0.05), row("base", "refusal_oos", 0.0),
            row("tuned", "refusal_oos", refusal), row("tuned", "wrongful_refusal", wrongful),
            row("tuned", "stop_rate", 1.0), row("base", "citation_accuracy", 0.1)]


def fabricate_run(folder, run: str, fast_path: str = "auto", seed: int = 42, eval_loss: float = 0.6,
                  metrics: list[dict] | None = None):
    """A finished run folder as notebooks 04 and 05 leave it, with an adapter and a progress file beside."""
    folder.mkdir(parents=True)
    record = {"notebook": "04", "profile": run, "started_at": "2026-12-02T14:40:00+00:00", "wall_time_s": 300.0,
              "commit": "0123456789abcdef", "command": "python -m utils.runner --profile gpu --only 04",
              "device": "NVIDIA H200", "compute_capability": "9.0", "versions": {"torch": "2.11.0"},
              "parameters": {"profile": run, "model_name": "embedded", "learning_rate": 1e-4, "max_steps": 20,
                             "fast_path": fast_path, "seed": seed, "output_dir": ""},
              "training": {"last_eval_loss": eval_loss, "max_steps": 20}}
    (folder / "04_run.json").write_text(json.dumps(record))
    (folder / "05_run.json").write_text(json.dumps({**record, "notebook": "05", "wall_time_s": 100.0}))
    payload = {"parameters": {"profile": run, "model_name": "embedded", "test_file": "t.jsonl"},
               "n_test_records": 129, "metrics": metrics or metric_rows(0.2, 0.8, 0.05)}
    (folder / "05_metrics.json").write_text(json.dumps(payload))
    pd.DataFrame({"step": [0, 10, 10, 20, 20], "loss": [None, 1.0, None, 0.3, None],
                  "eval_loss": [2.0, None, 0.9, None, eval_loss]}).to_csv(folder / "04_log_history.csv", index=False)
    (folder / "04_progress.json").write_text('{"step": 20, "max_steps": 20}')
    (folder / "04_adapter").mkdir()
    (folder / "04_adapter" / "adapter_config.json").write_text("{}")
    (folder / "figures").mkdir()
    (folder / "figures" / "04_loss_curve.pdf").write_bytes(b"%PDF")
    return folder


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """runs/, results/ and figures/ in tmp_path, for the runner's publishing."""
    for module in (runner, publishing):
        monkeypatch.setattr(module, "run_dir", lambda name: tmp_path / "runs" / name)
    monkeypatch.setattr(publishing, "published_results_dir", lambda name: tmp_path / "results" / name)
    monkeypatch.setattr(publishing, "published_figures_dir", lambda name: tmp_path / "figures" / name)
    return tmp_path


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def test_gpu_profiles_publish_results_and_keep_the_thesis_recipe():
    gpu_profile = config.load_profile("gpu")
    assert gpu_profile["publish_results"] is True and gpu_profile["common"]["model_name"] == "embedded"
    training = gpu_profile["notebooks"]["04"]
    recipe = {"learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "warmup_steps", "quantization", "max_seq_length", "optim", "compute_dtype"}
    assert not recipe & set(training), "the gpu profile must run the thesis recipe unchanged"
    tuned = runner.check_profile_keys("gpu-tuned", config.load_profile("gpu-tuned"))["notebooks"]["04"]
    sweep = json.loads((RESULTS_DIR / "04_recipe_sweep_gpu.json").read_text())["variants"]["lr1e3_e6_none"]
    for key, value in sweep["overrides"].items():
        if key != "model_name":
            assert tuned[key] == value, key
    assert not config.load_profile("demo").get("publish_results")


def test_set_is_typed_like_the_declared_default_and_reaches_the_right_blocks():
    profile = runner.check_profile_keys("gpu", config.load_profile("gpu"))
    changed = runner.apply_overrides(profile, ["04.fast_path=off", "seed=43", "04.learning_rate=1e-3",
                                                      "05.baselines=[base_rag]", "04.eval_steps=50"])
    assert changed["notebooks"]["04"]["fast_path"] == "off"
    assert changed["common"]["seed"] == 43 and isinstance(changed["common"]["seed"], int)
    assert changed["notebooks"]["04"]["learning_rate"] == 1e-3
    assert changed["notebooks"]["04"]["eval_steps"] == 50  # the profile's own 04 value is replaced
    assert changed["notebooks"]["05"]["baselines"] == ["base_rag"]
    assert config.notebook_parameters(changed, "05")["seed"] == 43
    assert profile["notebooks"]["04"]["eval_steps"] == 100, "the loaded profile itself is not changed"


@pytest.mark.parametrize("item, message", [
    ("04.fast_pth=off", "'fast_pth' is not declared by notebook 04"),
    ("max_seq_lenght=256", "not declared by any notebook"),
    ("04.max_steps=many", "expected an integer"),
    ("09.seed=1", "no notebook has the number 09"),
    ("fast_path", "write --set key=value"),
    ("profile=x", "--run-name"),
])
def test_set_errors_name_the_item_and_the_fix(item, message):
    with pytest.raises(config.ProfileError, match="--set") as info:
        runner.apply_overrides(config.load_profile("gpu"), [item])
    assert message in str(info.value)


def test_run_name_must_be_a_plain_folder_name():
    assert runner.check_run_name("gpu-off-s42") == "gpu-off-s42"
    for bad in ("../x", "a/b", "", "-x", ".."):
        with pytest.raises(config.ProfileError, match="--run-name"):
            runner.check_run_name(bad)


def test_a_named_run_goes_to_its_folder_with_its_name_as_profile(folders, monkeypatch):
    seen = []
    monkeypatch.setattr(runner, "run_with_progress",
                        lambda nb, out, params, desc, log: seen.append((nb.name[:2], out, params)) or 1.0)
    out = runner.run_profile("gpu", ["04", "05"], run_name="gpu-off-s42", overrides=["04.fast_path=off"])
    assert out == folders / "runs" / "gpu-off-s42"
    assert [s[0] for s in seen] == ["04", "05"]
    assert all(params["profile"] == "gpu-off-s42" for _, _, params in seen)
    assert seen[0][2]["fast_path"] == "off" and "fast_path" not in seen[1][2]
    summary = json.loads((out / "runner.json").read_text())
    assert summary["profile"] == "gpu" and summary["run"] == "gpu-off-s42"
    assert summary["command"] == ("python -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s42 "
                                  "--set 04.fast_path=off")


def test_publish_copies_data_files_and_writes_provenance(folders):
    run = fabricate_run(folders / "runs" / "gpu-off-s42", "gpu-off-s42", fast_path="off")
    (run / "runner.json").write_text(json.dumps({"command": "python -m utils.runner --profile gpu --run-name "
                                                            "gpu-off-s42", "overrides": ["04.fast_path=off"]}))
    published = publishing.publish_run("gpu", "gpu-off-s42")
    results, figures = folders / "results" / "gpu-off-s42", folders / "figures" / "gpu-off-s42"
    assert published == [figures, results]
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["04_run.json", "05_run.json", "05_metrics.json", "04_log_history.csv", "runner.json", "PROVENANCE.json"])
    assert (figures / "04_loss_curve.pdf").is_file()
    provenance = json.loads((results / "PROVENANCE.json").read_text())
    assert provenance["run"] == "gpu-off-s42" and provenance["profile"] == "gpu"
    assert provenance["device"] == "NVIDIA H200" and provenance["commit"] == "0123456789abcdef"
    assert provenance["wall_time_s"] == 400.0 and provenance["notebooks"]["05"]["wall_time_s"] == 100.0
    assert provenance["overrides"] == ["04.fast_path=off"] and "--run-name gpu-off-s42" in provenance["command"]


def test_a_partial_rerun_keeps_the_earlier_notebooks_provenance(folders):
    # results/gpu/ holds notebooks 01-05 of an earlier machine; notebooks 04-05 rerun elsewhere and are published
    results = folders / "results" / "gpu"
    results.mkdir(parents=True)
    (results / "01_run.json").write_text("{}")
    earlier = {"notebooks": {"01": {"wall_time_s": 10.0, "commit": "old"}, "04": {"wall_time_s": 999.0,
                                                                               "commit": "old"}}}
    (results / "PROVENANCE.json").write_text(json.dumps(earlier))
    fabricate_run(folders / "runs" / "gpu", "gpu")
    publishing.publish_results("gpu")
    provenance = json.loads((results / "PROVENANCE.json").read_text())
    assert provenance["notebooks"]["01"] == {"wall_time_s": 10.0, "commit": "old"}
    assert provenance["notebooks"]["04"]["commit"] == "0123456789abcdef"  # the rerun replaces the earlier 04
    assert provenance["wall_time_s"] == 410.0 and provenance["kept_from_earlier_publication"] == ["01"]
    assert provenance["commit"] == "old (01), 0123456 (04, 05)"  # not 01's commit alone with 04-05's command
    assert "01_run.json" in provenance["files"] and "PROVENANCE.json" not in provenance["files"]


def test_a_notebook_stopped_half_way_publishes_nothing_and_the_overrides_come_from_the_records(folders):
    # the GPU machine went back while 05 ran: 05 wrote its metrics and a table, but no 05_run.json; the runner had
    # not yet written runner.json, so the --set items come from 04's own command
    run = fabricate_run(folders / "runs" / "gpu-auto-s43", "gpu-auto-s43", seed=43)
    (run / "05_run.json").unlink()
    (run / "figures" / "05_subconjuntos.tex").write_text("x")
    record = json.loads((run / "04_run.json").read_text())
    record["command"] = ("python -m utils.runner --profile gpu --only 04 --run-name gpu-auto-s43 --set 04.seed=43 "
                         "--set '05.baselines=[]'")
    (run / "04_run.json").write_text(json.dumps(record))
    publishing.publish_run("gpu", "gpu-auto-s43")
    results, figures = folders / "results" / "gpu-auto-s43", folders / "figures" / "gpu-auto-s43"
    assert sorted(p.name for p in results.iterdir()) == ["04_log_history.csv", "04_run.json", "PROVENANCE.json"]
    assert sorted(p.name for p in figures.iterdir()) == ["04_loss_curve.pdf"]
    provenance = json.loads((results / "PROVENANCE.json").read_text())
    assert provenance["overrides"] == ["04.seed=43", "05.baselines=[]"]
    assert provenance["command"] == ("python -m utils.runner --profile gpu --run-name gpu-auto-s43 --set 04.seed=43 "
                                     "--set '05.baselines=[]'")
    assert list(provenance["notebooks"]) == ["04"]


def test_the_runner_records_how_it_was_started_before_the_first_notebook(folders, monkeypatch):
    def stop(nb, out, params, desc, log):
        assert json.loads((out / "runner.json").read_text())["overrides"] == ["04.seed=43"]
        raise runner.NotebookFailed("stopped")

    monkeypatch.setattr(runner, "run_with_progress", stop)
    with pytest.raises(runner.NotebookFailed):
        runner.run_profile("gpu", ["04"], run_name="gpu-auto-s43", overrides=["04.seed=43"])


def test_publish_results_needs_a_finished_notebook(folders):
    (folders / "runs" / "gpu").mkdir(parents=True)
    with pytest.raises(config.ProfileError, match="no NN_run.json"):
        publishing.publish_results("gpu")


def test_a_figures_only_profile_publishes_no_data(folders):
    fabricate_run(folders / "runs" / "demo", "demo")
    assert publishing.publish_run("demo") == [folders / "figures" / "demo"]
    assert not (folders / "results").exists()


def test_publish_results_key_must_be_a_bool(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PARAMS_DIR", tmp_path)
    (tmp_path / "x.yaml").write_text("publish_results: yes please\ncommon: {profile: x}\n")
    with pytest.raises(config.ProfileError, match="publish_results must be true or false"):
        config.load_profile("x")
    assert PARAMS_DIR.is_dir()


# --------------------------------------------------------------------------------------------
# Reading the published runs back: tables, verdicts, figures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def published(tmp_path):
    """results/ with gpu (auto, s42), gpu-tuned, and the off/auto runs of seeds 42 and 43."""
    root = tmp_path / "results"
    fabricate_run(root / "gpu", "gpu", metrics=metric_rows(0.02, 0.3, 0.2), eval_loss=0.78)
    fabricate_run(root / "gpu-tuned", "gpu-tuned", metrics=metric_rows(0.25, 0.8, 0.05))
    fabricate_run(root / "gpu-auto-s43", "gpu-auto-s43", seed=43, eval_loss=0.80)
    fabricate_run(root / "gpu-off-s42", "gpu-off-s42", fast_path="off", eval_loss=0.785)
    fabricate_run(root / "gpu-off-s43", "gpu-off-s43", fast_path="off", seed=43, eval_loss=0.79)
    for name in root.iterdir():
        (name / "PROVENANCE.json").write_text(json.dumps(
            {"run": name.name, "profile": "gpu", "date": "2026-12-02T14:40:00+00:00", "device": "NVIDIA H200",
             "commit": "0123456789abcdef", "command": "python -m utils.runner --profile gpu"}))
    (root / "04_unrelated.json").write_text("{}")
    (root / "history").mkdir()
    return root


def test_a_figure_names_the_commit_and_date_of_the_notebook_it_draws_from(published):
    # notebook 05 of gpu ran a session after its notebook 04, at another commit
    provenance = json.loads((published / "gpu" / "PROVENANCE.json").read_text())
    provenance["commit"] = "0123456 (04), 89abcde (05)"
    provenance["notebooks"] = {"04": {"commit": "0123456789abcdef", "started_at": "2026-12-02T14:40:00+00:00"},
                               "05": {"commit": "89abcde", "started_at": "2026-12-03T06:33:26+00:00",
                                      "device": "NVIDIA H200"}}
    (published / "gpu" / "PROVENANCE.json").write_text(json.dumps(provenance))
    result = gpu.collect_gpu_results(published, ["gpu"])["gpu"]
    assert gpu.gpu_source(result, "04") == "medido en NVIDIA H200, 2026-12-02, commit 0123456"
    assert gpu.gpu_source(result, "05") == "medido en NVIDIA H200, 2026-12-03, commit 89abcde"
    assert gpu.gpu_source(result) == "medido en NVIDIA H200, 2026-12-02, commit 0123456 (04), 89abcde (05)"


def test_collect_reads_only_published_folders_with_their_origin(published):
    results = gpu.collect_gpu_results(published)
    assert list(results) == ["gpu", "gpu-auto-s43", "gpu-off-s42", "gpu-off-s43", "gpu-tuned"]
    assert gpu.gpu_source(results["gpu"]) == "medido en NVIDIA H200, 2026-12-02, commit 0123456"
    assert gpu.gpu_source(results["gpu"], "05") == "medido en NVIDIA H200, 2026-12-02, commit 0123456"  # no record
    assert results["gpu"]["identity"]["n_test_records"] == 129
    assert set(results["gpu"]["history"]["split"]) == {"train", "eval"}
    assert list(gpu.collect_gpu_results(published, ["gpu-tuned", "nope"])) == ["gpu-tuned"]
    assert gpu.collect_gpu_results(published / "nothing") == {}


def test_a_broken_metrics_file_is_one_clear_error(published):
    (published / "gpu" / "05_metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'metrics' list"):
        gpu.collect_gpu_results(published)


def test_runs_table_puts_this_run_beside_the_gpu_runs(published):
    results = gpu.collect_gpu_results(published, ["gpu", "gpu-tuned"])
    summaries = {"demo": pd.DataFrame(metric_rows(0.0, 0.1, 0.3)), **{n: r["summary"] for n, r in results.items()}}
    table = gpu.gpu_runs_table(summaries)
    assert list(table.columns) == ["demo", "gpu", "gpu-tuned"]
    assert table.loc[("Ajustado (LoRA)", "Rechazo correcto (fuera de alcance)"), "gpu-tuned"] == "0,80 [0,70; 0,90]"
    assert table.loc[("Base", "Exactitud de citas"), "gpu"] == "0,10 [0,00; 0,20]"
    assert not any("−" in system for system, _ in table.index), "differences are not systems"
    assert gpu.gpu_runs_table({}).empty


def test_targets_are_computed_per_run(published):
    results = gpu.collect_gpu_results(published, ["gpu", "gpu-tuned"])
    table = gpu_runs.targets_table({n: r["summary"] for n, r in results.items()})
    assert table.loc["gpu-tuned"].str.endswith(": cumple").all()
    assert table.loc["gpu"].str.endswith("no cumple").all()


def test_fast_path_off_and_auto_agree_within_seed_noise_or_not(published):
    results = gpu.collect_gpu_results(published)
    runs = gpu.fast_path_runs(results)
    assert sorted(runs["run"]) == ["gpu", "gpu-auto-s43", "gpu-off-s42", "gpu-off-s43", "gpu-tuned"]
    check = gpu.seed_noise_check(runs[runs["run"] != "gpu-tuned"], "final_eval_loss")
    # path gap: (|0.785 - 0.78| + |0.79 - 0.80|) / 2 = 0.0075; seed noise: (|0.78 - 0.80| + |0.785 - 0.79|) / 2
    assert check["path_gap"] == pytest.approx(0.0075) and check["seed_noise"] == pytest.approx(0.0125)
    assert check["agree"] and check["seeds"] == [42, 43]
    far = runs.assign(final_eval_loss=[0.78, 0.80, 0.95, 0.96, 0.6])
    assert not gpu.seed_noise_check(far[far["run"] != "gpu-tuned"], "final_eval_loss")["agree"]
    assert gpu.seed_noise_check(runs[runs["seed"] == 42], "final_eval_loss") is None
    text = gpu_runs.describe_seed_noise(runs[runs["run"] != "gpu-tuned"])
    assert "pérdida de validación final" in text and "coinciden dentro del ruido de semilla" in text
    assert "Todavía no hay" in gpu_runs.describe_seed_noise(gpu.fast_path_runs({}))


def test_fast_path_runs_leave_out_another_recipe(published):
    record = json.loads((published / "gpu-tuned" / "04_run.json").read_text())
    record["parameters"]["learning_rate"] = 1e-3
    (published / "gpu-tuned" / "04_run.json").write_text(json.dumps(record))
    runs = gpu.fast_path_runs(gpu.collect_gpu_results(published))
    assert "gpu-tuned" not in set(runs["run"]) and len(runs) == 4
    assert math.isclose(runs.set_index("run").loc["gpu-off-s43", "final_eval_loss"], 0.79)


def test_gpu_figures_meet_the_print_standard(published):
    set_figure_context("embedded", "test")
    results = gpu.collect_gpu_results(published, ["gpu", "gpu-tuned"])
    summaries = {"demo": pd.DataFrame(metric_rows(0.0, 0.1, 0.3)), **{n: r["summary"] for n, r in results.items()}}
    for fig in (gpu_runs.plot_gpu_targets(summaries), gpu_runs.plot_gpu_loss_curves(results)):
        assert check_print_standard(fig, "test") >= 8
        plt.close(fig)
    assert "paso 20" in gpu_runs.describe_gpu_curves(results)


def test_learning_curve_from_the_committed_sweep():
    sweep = json.loads((RESULTS_DIR / "04_recipe_sweep_gpu.json").read_text())
    curve, base = gpu_runs.learning_curve(sweep)
    assert list(curve["variant"]) == ["lr1e3_e1_none", "lr1e3_e3_none", "lr1e3_e6_none"]
    assert list(curve["examples"]) == sorted(curve["examples"]) and curve["examples"].iloc[-1] == 610 * 8
    assert set(base) == {"keyword_recall_fact", "refusal_oos", "wrongful_refusal"}
    set_figure_context("embedded", "test")
    fig = gpu_runs.plot_learning_curve(curve, base, 160)
    assert check_print_standard(fig, "test") >= 8
    plt.close(fig)
    text = gpu_runs.describe_learning_curve(curve, base, 160)
    assert "160 ejemplos" in text and "814" in text
    assert "no hay curva" in gpu_runs.describe_learning_curve(curve.iloc[0:0], base, 160)
    assert list(curve["n_wrongful_refusal"]) == [74 + 15] * 3 and list(curve["n_refusal_oos"]) == [40] * 3


def test_with_no_variant_on_both_targets_the_text_names_the_nearest_miss_and_its_margin():
    """6 epochs: 80 % correct refusals, 10,11 % wrongful (9 of 89 answerable, the target allows 8): a fine margin."""
    sweep = json.loads((RESULTS_DIR / "04_recipe_sweep_gpu.json").read_text())
    curve, base = gpu_runs.learning_curve(sweep)
    curve = curve.assign(refusal_oos=[0.65, 0.75, 0.80], wrongful_refusal=[0.1685, 0.1124, 9 / 89])
    text = gpu_runs.describe_learning_curve(curve, base, 48)
    assert "ninguna variante cumple las dos metas" in text
    assert "la más cercana, la de 6,0 épocas (4.880 ejemplos)" in text
    assert "cumple la de rechazo correcto (80,0\xa0%)" in text
    assert "por 0,11 puntos porcentuales (10,11\xa0% contra ≤ 10\xa0%" in text
    assert "9 de 89 preguntas respondibles, donde la meta admite hasta 8" in text
    met = gpu_runs.describe_learning_curve(curve.assign(wrongful_refusal=[0.1685, 0.1124, 0.09]), base, 48)
    assert "la primera variante que cumple las dos metas" in met and "más cercana" not in met


def test_the_gpu_runs_text_calls_overfitting_only_a_rising_validation_loss():
    from utils.reports.training import validation_turn

    results = {n: r for n, r in gpu.collect_gpu_results(names=gpu.GPU_RUNS).items() if len(r["history"])}
    lines = gpu_runs.describe_gpu_curves(results).splitlines()
    assert len(lines) == len(results)
    for line, result in zip(lines, results.values()):
        evals = result["history"][result["history"]["split"] == "eval"]
        trend = validation_turn(evals["step"], evals["loss"])["trend"]
        assert ("(sobreajuste)" in line) == (trend == "rising"), line


def test_a_misspelt_set_stops_the_command_before_any_notebook_runs():
    out = subprocess.run([sys.executable, "-m", "utils.runner", "--profile", "gpu", "--only", "04", "--set",
                          "04.fast_pth=off"], capture_output=True, text=True)
    assert out.returncode == 1 and "'fast_pth' is not declared by notebook 04" in out.stderr
    assert "Traceback" not in out.stderr
