"""The speed benchmark: its batches, its ratios, its committed results, and a tiny end-to-end run on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from utils.paths import REPO_ROOT, RESULTS_DIR
from utils.plotting import speed as speed_plots
from utils.speed.benchmark.cli import main
from utils.speed.benchmark.configs import BenchConfig, config_by_name
from utils.speed.benchmark.run import run_benchmark
from utils.speed.benchmark.workloads import corpus_steps
from utils.speed.results import (
    OLD_FAST_KEYS,
    compare_losses,
    load_report,
    merged_rows,
    speed_table,
    summarize,
    upgrade_row,
)


def _examples(lengths):
    return [{"ids": list(range(1, n + 1)), "labels": [-100] * (n // 2) + list(range(n // 2 + 1, n + 1))}
            for n in lengths]


def test_fast_corpus_batches_pack_whole_examples_without_padding():
    config = config_by_name("fast_mb32_corpus_bf16")
    examples = _examples([100, 300, 200, 450, 120, 80] * 20)
    steps = corpus_steps(config, examples, steps=3)
    for (batch,) in steps:
        assert batch.input_ids.shape[0] == 1 and batch.attention_mask is None
        assert batch.tokens == batch.input_ids.numel() <= config.micro_batch * config.max_seq_length
        starts = batch.position_ids[0] == 0
        assert (batch.labels[0][starts] == -100).all()  # no prediction across an example boundary
    # every example whole, in corpus order (cycling), nothing dropped between steps
    count = sum(int((b.position_ids[0] == 0).sum()) for (b,) in steps)
    expected = [t for i in range(count) for t in examples[i % len(examples)]["ids"]]
    assert torch.cat([b.input_ids[0] for (b,) in steps]).tolist() == expected


def test_original_recipe_sees_two_examples_per_step_on_both_paths():
    examples = _examples([30, 40, 50, 60])
    original = corpus_steps(config_by_name("original_corpus_fp16"), examples, steps=2)
    fast = corpus_steps(config_by_name("fast_2x1_corpus_fp16"), examples, steps=2)
    for orig_step, (fast_batch,) in zip(original, fast):
        assert len(orig_step) == 2 and all(b.input_ids.shape == (1, b.tokens) for b in orig_step)
        assert torch.equal(torch.cat([b.input_ids for b in orig_step], 1), fast_batch.input_ids)
        assert sum(b.tokens for b in orig_step) == fast_batch.tokens


def _row(name, tps, reserved, impl="fast", dtype="bf16", workload="synthetic", sps=1.0):
    return {"name": name, "ok": True, "impl": impl, "dtype": dtype, "workload": workload,
            "tokens_per_second": tps, "peak_reserved_gib": reserved, "seconds_per_step": sps,
            "peak_allocated_gib": reserved - 0.5}


def test_summary_counts_only_configurations_within_the_budget():
    rows = [_row("original_fp16", 1000, 5.3, impl="hf", dtype="fp16", sps=0.8),
            _row("fast_big", 30000, 9.0), _row("fast_ok", 20000, 7.4),
            _row("fast_2x1_fp16", 3000, 3.0, dtype="fp16", sps=0.2),
            _row("unsloth_x", 25000, 7.0, impl="unsloth")]
    summary = summarize(rows)
    assert summary["fast_best_bf16"]["name"] == "fast_ok"
    assert summary["fast_best_bf16"]["x_original_fp16"] == 20.0
    assert summary["fast_best_bf16"]["x_unsloth_best"] == 0.8
    assert summary["recipe_fp16"]["x_fewer_seconds"] == 4.0


def test_summary_compares_with_unsloth_before_the_original_has_run():
    """A run's summary is rewritten after each row: with the fast and Unsloth rows done and the original not yet (the
    strict run's order), the Unsloth ratio is taken and the ratio to the original waits (a KeyError stopped the H200
    run of 2026-12-03 there)."""
    summary = summarize([_row("fast_ok", 20000, 7.4), _row("unsloth_x", 25000, 7.0, impl="unsloth")])
    assert summary["fast_best_bf16"] == {"name": "fast_ok", "tokens_per_second": 20000, "peak_reserved_gib": 7.4,
                                         "x_unsloth_best": 0.8}
    assert summary["unsloth_best_bf16"]["name"] == "unsloth_x"


def test_repeats_are_merged_into_medians_and_the_largest_peaks():
    rows = [_row("original_fp16", tps, 5.3, impl="hf", dtype="fp16", sps=sps)
            for tps, sps in ((1000, 1.0), (800, 1.25), (1250, 0.8))]
    rows += [_row("fast_2x1_fp16", 3000, reserved, dtype="fp16", sps=sps)
             for reserved, sps in ((3.0, 0.3), (3.2, 0.25), (3.1, 0.5))]
    rows.append({"name": "fast_2x1_fp16", "ok": False, "error": "out of memory"})  # a failed repeat is left out
    merged = {r["name"]: r for r in merged_rows(rows)}
    assert merged["original_fp16"]["seconds_per_step"] == 1.0 and merged["original_fp16"]["repeats"] == 3
    assert merged["fast_2x1_fp16"]["seconds_per_step"] == 0.3
    assert merged["fast_2x1_fp16"]["peak_reserved_gib"] == 3.2
    assert merged["fast_2x1_fp16"]["seconds_per_step_repeats"] == [0.3, 0.25, 0.5]
    assert summarize(rows)["recipe_fp16"]["x_fewer_seconds"] == 3.33
    single = [_row("fast_ok", 20000, 7.4)]
    assert merged_rows(single) == single  # without repeats a row is kept as it is


def test_committed_results_are_consistent_and_their_figures_draw(tmp_path, monkeypatch):
    report = json.loads((RESULTS_DIR / "04_speed_benchmark.json").read_text())
    assert report["device"].startswith("NVIDIA") and report["date"].startswith("2026-")
    assert report["summary"] == summarize(report["rows"])  # the ratios come from the rows
    names = {r["name"] for r in report["rows"] if r.get("ok")}
    assert {"original_fp16", "fast_2x1_fp16"} <= names
    for run in json.loads((RESULTS_DIR / "04_speed_runs_h200.json").read_text())["invocations"]:
        assert run["summary"] == summarize(run["rows"]), run["invocation"]
    correctness = json.loads((RESULTS_DIR / "04_fast_path_correctness.json").read_text())
    assert correctness["comparison"] == compare_losses(correctness["runs"])
    ddp = json.loads((RESULTS_DIR / "04_ddp_scaling.json").read_text())
    one, two = (r["steady_tokens_per_second"] for r in ddp["runs"])
    assert ddp["speedup"] == round(two / one, 2)
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(tmp_path))
    import matplotlib.pyplot as plt

    for fig in (speed_plots.plot_benchmark(report), speed_plots.plot_correctness(correctness)):
        fig.savefig(tmp_path / "f.png")
        plt.close(fig)


def test_committed_rows_are_read_in_todays_layout():
    """Rows written before BenchConfig nested FastPathOptions load with ``fast`` and ``max_seq_length``."""
    raw = json.loads((RESULTS_DIR / "04_speed_benchmark.json").read_text())
    report = load_report("results/04_speed_benchmark.json")
    for old, new in zip(raw["rows"], report["rows"]):
        assert "seq_len" not in new and new["max_seq_length"] == old["seq_len"]
        assert new["fast"] == {"checkpoint": old["checkpoint"], "offload_checkpoints": old["offload"],
                               "skip_down_recompute": old["skip_down"], "checkpoint_keep": old["checkpoint_keep"],
                               "kernels": old["kernels"], "mlp_chunk_tokens": old["mlp_chunk_tokens"]}
        assert {k: v for k, v in new.items() if k not in ("fast", "max_seq_length")} == {
            k: v for k, v in old.items() if k not in ("seq_len", *OLD_FAST_KEYS)}  # every number untouched
        assert upgrade_row(new) is new  # a row in today's layout stays as it is
    assert BenchConfig.from_dict(report["rows"][0]) == config_by_name(report["rows"][0]["name"])
    assert speed_table(report).equals(speed_table(raw))
    runs = load_report("results/04_speed_runs_h200.json")["invocations"]
    assert all("fast" in row and "max_seq_length" in row for run in runs for row in run["rows"])


def test_benchmark_child_can_import_unsloth_before_transformers():
    """What ``python -m utils.speed.benchmark`` imports before ``import_unsloth_first`` leaves transformers out."""
    code = ("import sys; import utils.speed.benchmark.peer; "
            "print(sorted({'transformers', 'peft', 'trl'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_run_without_a_gpu_says_how_to_test_the_logic():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "utils.speed.benchmark", "run", "--out", "/tmp/x.json"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 1 and "--tiny" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_gpu_commands_refuse_a_cpu_machine_with_one_message(capsys):
    assert main(["profile", "fast_2x1_fp16", "--model", "unused"]) == 1
    assert main(["run", "--only", "original_fp16"]) == 1
    assert capsys.readouterr().err.count("needs a CUDA GPU") == 2


def test_unknown_configuration_lists_the_known_ones():
    with pytest.raises(SystemExit, match="original_fp16"):
        config_by_name("nope")
    with pytest.raises(SystemExit, match="--repeat-only fast_mb32_bf16: not in the list"):
        run_benchmark(Path("unused.json"), ["original_fp16"], repeat=2, repeat_only=["fast_mb32_bf16"])


@pytest.mark.slow
def test_tiny_benchmark_runs_both_paths_to_the_same_losses(tmp_path):
    """Each configuration in its own process; on a 2-layer twin the fast path follows the original's losses."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "utils.speed.benchmark", "run", "--tiny", "--only", "original_fp16,fast_2x1_fp16",
         "--steps", "2", "--warmup", "1", "--twin-folder", str(tmp_path / "twin"), "--out", str(out),
         "--memory-cap-gib", "7.5", "--repeat", "2", "--repeat-only", "fast_2x1_fp16"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["memory_cap_gib"] == 7.5 and "capped at 7.5 GiB" in report["method"]  # recorded with the run
    assert [(r["name"], r["repeat"]) for r in report["rows"]] == [  # round robin, the second round: fast only
        ("original_fp16", 0), ("fast_2x1_fp16", 0), ("fast_2x1_fp16", 1)]
    assert "fast_2x1_fp16 only, after the first round" in report["method"]
    assert report["summary"] == summarize(report["rows"]) and "recipe_fp16" in report["summary"]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["original_fp16"]["ok"] and rows["fast_2x1_fp16"]["ok"], rows
    assert rows["fast_2x1_fp16"]["losses"] == pytest.approx(rows["original_fp16"]["losses"], abs=1e-3)
    assert (tmp_path / "04_speed_benchmark.png").exists()  # a test run draws next to its JSON, not in figures/
    # rows nest the fast path's options; the report records the commit and the command that wrote it
    fast_row = rows["fast_2x1_fp16"]
    assert fast_row["fast"]["checkpoint_keep"] == "mid+qkv" and fast_row["max_seq_length"] == 64
    assert BenchConfig.from_dict(fast_row) == replace(config_by_name("fast_2x1_fp16"), max_seq_length=64)
    assert report["commit"] and report["command"].startswith("python -m utils.speed.benchmark run --tiny")


def test_readme_quotes_the_committed_measurements():
    """The README's speed table and ratios are the numbers of the committed result files."""
    readme = (REPO_ROOT / "README.md").read_text()
    report = json.loads((RESULTS_DIR / "04_speed_benchmark.json").read_text())
    rows = {r["name"]: r for r in merged_rows(report["rows"])}  # repeated rows: their medians
    original = rows["original_fp16"]["tokens_per_second"]
    for name, row in rows.items():
        assert f"| {row['tokens_per_second']:,.0f} | {row['seconds_per_step']:.3f} |" in readme, name
        if name.startswith(("fast_mb", "unsloth_mb")):
            assert f"| {row['tokens_per_second'] / original:.1f} |" in readme, name
    summary = report["summary"]
    assert f"**{summary['recipe_fp16']['x_fewer_seconds']}× fewer s/step**" in readme
    assert f"**{summary['fast_best_bf16']['x_original_fp16']:.1f}×** the original" in readme
    assert f"**{summary['fast_best_bf16']['x_unsloth_best']:.2f}× Unsloth" in readme
    assert f"**{summary['fast_best_fp16']['x_unsloth_best']:.2f}×** its fp16 row" in readme
    runs = {run["invocation"]: run for run in
            json.loads((RESULTS_DIR / "04_speed_runs_h200.json").read_text())["invocations"]}
    assert f"**{runs['e2']['summary']['fast_best_bf16']['x_original_fp16']:.1f}×**" in readme
    corpus = json.loads((RESULTS_DIR / "04_speed_corpus_h200.json").read_text())
    corpus_rows = {r["name"]: r for r in corpus["rows"] if r.get("ok")}
    assert f"**{corpus_rows['fast_mb32_corpus_bf16']['tokens_per_second']:,.0f} real tokens/s**" in readme
    assert f"{corpus['summary']['corpus_fast_best_bf16']['x_original_corpus_fp16']:.0f}× the original" in readme
    assert f"{corpus_rows['fast_mb32_bf16']['tokens_per_second']:,.0f} tokens/s in bf16" in readme
    correctness = json.loads((RESULTS_DIR / "04_fast_path_correctness.json").read_text())["comparison"]
    for key in ("fast_vs_original_seed0", "fast_vs_original_seed1", "original_seed_vs_seed"):
        assert f"{correctness[key]:.4f}" in readme, key
    ddp = json.loads((RESULTS_DIR / "04_ddp_scaling.json").read_text())
    assert f"{ddp['speedup']:.2f}×" in readme


# The strict 8 GB budget (run --budget strict8)

def _strict_row(name, seconds, repeat=0, alloc="expandable_segments:True", in_budget=True, tokens=1000.0, **kw):
    config = config_by_name(name)
    use = {"in_budget": in_budget, "device_gib": 7.0, "pinned_host_gib": 3.0}
    return {"name": name, "impl": config.impl, "dtype": config.dtype, "workload": config.workload,
            "micro_batch": config.micro_batch, "accumulation": config.accumulation, "ok": True, "repeat": repeat,
            "seconds_per_step": seconds, "tokens_per_second": tokens, "alloc_conf": alloc, "budget": use, **kw}


def test_strict_run_gives_every_row_one_allocator_setting_and_the_thesis_dropout(monkeypatch, tmp_path):
    from utils.speed.benchmark import run as run_module

    tasks = []

    def fake_child(task, timeout, env):
        tasks.append((task, env))
        return {**task["config"], "ok": False, "error": "not run"}

    monkeypatch.setattr(run_module, "default_device", lambda: "cuda:0")  # keeps the Unsloth rows in the list
    monkeypatch.setattr(run_module, "save_twin", lambda folder, tiny, device: {"folder": str(folder)})
    monkeypatch.setattr(run_module, "run_child", fake_child)
    report = run_benchmark(tmp_path / "strict.json", ["original_fp16", "fast_2x1_fp16", "unsloth_mb32_bf16"],
                           repeat=2, repeat_only=["original_fp16", "fast_2x1_fp16"], budget="strict8",
                           twin_folder=str(tmp_path / "twin"), alloc_conf="expandable_segments:False")
    names = [task["config"]["name"] for task, _ in tasks]
    assert names == ["original_fp16", "fast_2x1_fp16", "unsloth_mb32_bf16", "original_fp16", "fast_2x1_fp16"]
    both_names = dict.fromkeys(("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"), "expandable_segments:False")
    assert all(env == both_names for _, env in tasks)
    assert all(task["config"]["lora_dropout"] == 0.05 for task, _ in tasks)  # Unsloth's row too (it had 0)
    assert all(task["budget"] == {"card_gib": 8.0, "display_reserve_gib": 0.5, "pinned_limit_gib": 4.0}
               for task, _ in tasks)
    assert report["budget"]["alloc_conf"] == "expandable_segments:False" and report["budget"]["device_limit_gib"] == 7.5
    assert "Strict budget (strict8)" in report["method"] and report["strict"]["in_budget"] == []


def test_strict_run_refuses_a_second_cap_a_fixed_dropout_and_an_unknown_budget():
    with pytest.raises(SystemExit, match="drop --memory-cap-gib"):
        run_benchmark(Path("unused.json"), ["original_fp16"], memory_cap_gib=7.5, budget="strict8")
    with pytest.raises(SystemExit, match="fast_mb32_dropout0_bf16 fix it at 0"):
        run_benchmark(Path("unused.json"), ["fast_mb32_dropout0_bf16"], budget="strict8")
    with pytest.raises(SystemExit, match="--budget strict16"):
        run_benchmark(Path("unused.json"), ["original_fp16"], budget="strict16")


def test_the_recorded_allocator_setting_is_the_one_pytorch_reads_after_unsloth_moved_it():
    from utils.speed.benchmark.strict import alloc_env, effective_alloc_conf

    env = alloc_env("expandable_segments:True")
    moved = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # Unsloth's import on torch >= 2.10 deletes the other
    assert effective_alloc_conf("2.11.0+cu130", env) == "expandable_segments:True"
    assert effective_alloc_conf("2.11.0", moved) == "expandable_segments:True"
    assert effective_alloc_conf("2.9.1", env) == "expandable_segments:True"
    assert effective_alloc_conf("2.9.1", moved) is None  # an older PyTorch reads only the legacy name
    assert effective_alloc_conf("2.10.0", {"PYTORCH_ALLOC_CONF": "a", "PYTORCH_CUDA_ALLOC_CONF": "b"}) == "a"
    assert effective_alloc_conf("2.12.0", {"PYTORCH_CUDA_ALLOC_CONF": "b"}) == "b"


def test_strict_summary_takes_no_ratio_across_allocator_settings():
    from utils.speed.benchmark.strict import strict_summary

    rows = [_strict_row("fast_mb32_keep_input_bf16", 0.6, tokens=26000.0),
            _strict_row("unsloth_mb32_bf16", 0.8, tokens=20000.0)]
    same = strict_summary(rows)
    assert same["same_allocator"] and same["fast_best_bf16"]["x_unsloth_best"] == 1.3
    rows[1]["alloc_conf"] = None  # the peer ran without expandable segments
    mixed = strict_summary(rows)
    assert not mixed["same_allocator"] and "fast_best_bf16" not in mixed and "PYTORCH_CUDA_ALLOC_CONF" in mixed["error"]


def test_strict_summary_compares_only_rows_within_the_budget():
    from utils.speed.benchmark.strict import strict_summary

    rows = [_strict_row("fast_mb32_bf16", 0.55, tokens=29000.0, in_budget=False),  # 10 GB pinned: out
            _strict_row("fast_mb32_keep_input_bf16", 0.6, tokens=26000.0),
            _strict_row("unsloth_mb40_bf16", 0.9, tokens=23000.0, repeat=0),
            _strict_row("unsloth_mb40_bf16", 0.9, tokens=23000.0, repeat=1, in_budget=False),  # out once: out
            _strict_row("unsloth_mb32_bf16", 0.8, tokens=20000.0)]
    summary = strict_summary(rows)
    assert summary["fast_best_bf16"]["name"] == "fast_mb32_keep_input_bf16"
    assert summary["unsloth_best_bf16"]["name"] == "unsloth_mb32_bf16"
    assert summary["out_of_budget"] == ["fast_mb32_bf16", "unsloth_mb40_bf16"]


def test_strict_recipe_ratio_is_the_ratio_of_medians_with_the_paired_spread():
    from utils.speed.benchmark.strict import strict_summary

    originals = [1.0, 1.2, 0.9, 1.1, 1.05]
    fasts = [0.25, 0.3, 0.2, 0.25, 0.3]
    rows = [row for i, (o, f) in enumerate(zip(originals, fasts))
            for row in (_strict_row("original_corpus_fp16", o, repeat=i), _strict_row("fast_2x1_corpus_fp16", f,
                                                                                        repeat=i))]
    recipe = strict_summary(rows)["recipe_corpus"]
    assert recipe["repeats"] == 5 and recipe["original_seconds_per_step"] == 1.05
    assert recipe["fast_seconds_per_step"] == 0.25 and recipe["x_fewer_seconds"] == 4.2
    assert recipe["paired_ratios"] == [4.0, 4.0, 4.5, 4.4, 3.5]
    assert (recipe["paired_min"], recipe["paired_max"]) == (3.5, 4.5)


def test_pinned_memory_over_the_limit_stops_the_row_after_its_first_step():
    from utils.memory.budget import PinnedMemoryOverBudget
    from utils.speed.benchmark.measure import _budget_hook

    seen = []
    readings = iter([0.0, 4.6])  # nothing pinned before the first step; its checkpoint buffers after it
    hook = _budget_hook(lambda: {"pinned_host_gib": next(readings), "pinned_limit_gib": 4.0}, seen.append)
    hook(0)
    with pytest.raises(PinnedMemoryOverBudget, match="4.60 GiB of pinned host memory"):
        hook(1)
    assert seen == [0]  # the caller's own hook (a profiler) still runs, but not past the refusal
    within = _budget_hook(lambda: {"pinned_host_gib": 3.4, "pinned_limit_gib": 4.0})
    within(0), within(1), within(2)


def test_strict_table_shows_each_part_of_the_budget():
    from utils.speed.benchmark.strict import strict_table

    row = _strict_row("fast_mb32_keep_input_bf16", 0.6, tokens=26000.0, allocator={"num_alloc_retries": 3})
    again = {**row, "repeat": 1, "allocator": {"num_alloc_retries": 8}}  # the most retries of the row's repeats
    row["budget"] = again["budget"] = {"in_budget": True, "peak_reserved_gib": 6.5, "outside_allocator_gib": 0.2,
                                       "paged_optimizer_gib": 0.09, "cuda_context_gib": 0.51, "device_gib": 7.21,
                                       "device_headroom_gib": 0.29, "pinned_host_gib": 3.38}
    stopped = {**_strict_row("fast_mb32_bf16", None), "ok": False, "error": "out of budget: 9.40 GiB of pinned host "
               "memory", "budget": {"in_budget": False, "over": ["pinned host memory 9.40 GiB > 4 GiB"],
                                    "pinned_host_gib": 9.4}}
    table = strict_table({"rows": [row, again, _strict_row("unsloth_mb32_bf16", 0.8, in_budget=False), stopped]})
    assert table.loc["fast_mb32_keep_input_bf16", "GiB GPU en total"] == 7.21
    assert table.loc["fast_mb32_keep_input_bf16", "reintentos del asignador"] == 8
    assert pd.isna(table.loc["unsloth_mb32_bf16", "reintentos del asignador"])  # no allocator statistics
    assert table["dentro del presupuesto"].tolist() == [True, False, False]
    assert table.loc["fast_mb32_bf16", "GiB fijados en la CPU"] == 9.4  # stopped: its use shown, no speed
    assert table.loc["fast_mb32_bf16", "motivo"] == "pinned host memory 9.40 GiB > 4 GiB"
    assert pd.isna(table.loc["fast_mb32_bf16", "tokens/s"])


def test_cli_passes_the_budget_and_the_allocator_setting(monkeypatch, tmp_path):
    from utils.speed.benchmark import cli

    calls = []
    monkeypatch.setattr(cli, "run_benchmark", lambda *args, **kw: calls.append(kw))
    assert main(["run", "--tiny", "--no-figure", "--budget", "strict8", "--out", str(tmp_path / "s.json")]) == 0
    assert calls[-1]["budget"] == "strict8" and calls[-1]["alloc_conf"] == "expandable_segments:True"
    main(["run", "--tiny", "--no-figure", "--budget", "strict8", "--alloc-conf", "expandable_segments:False",
          "--out", str(tmp_path / "s.json")])
    assert calls[-1]["alloc_conf"] == "expandable_segments:False"
    with pytest.raises(SystemExit):
        main(["run", "--tiny", "--budget", "strict16"])


def test_each_row_prints_its_budget_use_and_verdict(capsys):
    from utils.speed.benchmark.run import _print_row

    use = {"peak_reserved_gib": 6.9, "outside_allocator_gib": 0.2, "paged_optimizer_gib": 0.09,
           "cuda_context_gib": 0.51, "device_gib": 7.61, "device_limit_gib": 7.5, "pinned_host_gib": 3.4,
           "pinned_limit_gib": 4.0, "in_budget": False, "over": ["GPU 7.61 GiB > 7.5 GiB"]}
    row = {**_strict_row("fast_mb32_keep_input_bf16", 0.6), "peak_allocated_gib": 5.0, "peak_reserved_gib": 6.9,
           "first_loss": 12.0, "last_loss": 11.0, "budget": use}
    _print_row(config_by_name("fast_mb32_keep_input_bf16"), row)
    out = capsys.readouterr().out
    assert "= 7.61 of 7.5 GiB; pinned 3.4 of 4.0 GiB: OUT: GPU 7.61 GiB > 7.5 GiB" in out


def test_strict_cap_leaves_out_the_memory_found_outside_the_allocator_after_the_first_step():
    from utils.speed.benchmark.measure import _budget_hook, tightened_cap_gib

    current = {"device_limit_gib": 7.5, "cuda_context_gib": 0.51, "outside_allocator_gib": 0.25,
               "paged_optimizer_gib": 0.09, "pinned_host_gib": 3.4, "pinned_limit_gib": 4.0}
    assert tightened_cap_gib(current) == pytest.approx(6.74)
    # a reading that missed the unified memory: the paged states counted stand in
    assert tightened_cap_gib({**current, "outside_allocator_gib": 0.0}) == pytest.approx(6.9)
    tightened = []
    hook = _budget_hook(lambda: current, tighten=tightened.append)
    for step in range(4):
        hook(step)
    assert tightened == [current]  # once, after the first step


def test_a_stopped_run_resumes_with_the_rows_it_lacks_in_the_same_order(monkeypatch, tmp_path):
    from utils.files import read_json, save_json
    from utils.speed.benchmark import run as run_module

    tasks = []

    def fake_child(task, timeout, env):
        tasks.append(task["config"]["name"])
        return {**task["config"], "ok": False, "error": "not run"}

    monkeypatch.setattr(run_module, "save_twin", lambda folder, tiny, device: {"folder": str(folder)})
    monkeypatch.setattr(run_module, "run_child", fake_child)
    out = tmp_path / "strict.json"
    options = dict(names=["original_fp16", "fast_2x1_fp16", "fast_mb32_keep_input_bf16"], repeat=3,
                   repeat_only=["original_fp16", "fast_2x1_fp16"], budget="strict8", twin_folder=str(tmp_path))
    full = run_benchmark(out, **options)
    plan = [name for _, name in full["plan"]]
    assert plan == tasks and len(plan) == 7
    stopped = read_json(out)
    stopped["rows"] = stopped["rows"][:4]  # stopped by a time limit after four rows
    save_json(stopped, out)
    tasks.clear()
    resumed = run_benchmark(out, **options, resume=True)
    assert tasks == plan[4:] and [r["name"] for r in resumed["rows"]] == plan
    assert [r["repeat"] for r in resumed["rows"]] == [0, 0, 0, 1, 1, 2, 2]
    assert len(resumed["resumed"]) == 1 and resumed["date"] == stopped["date"]
    with pytest.raises(SystemExit, match="written by another run"):
        run_benchmark(out, **options, resume=True, alloc_conf="expandable_segments:False")
    with pytest.raises(SystemExit, match="does not exist"):
        run_benchmark(tmp_path / "none.json", **options, resume=True)


def test_a_row_prefers_its_blas_library_on_a_gpu_only_and_refuses_an_unknown_one(monkeypatch):
    from utils.speed.benchmark import measure

    chosen = []
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", lambda backend=None: chosen.append(backend))
    lt = config_by_name("fast_mb32_keep_input_cublaslt_fp16")
    assert lt.blas == "cublaslt" and config_by_name("fast_mb32_keep_input_fp16").blas == ""
    measure._prefer_blas(lt, cuda=False)  # a CPU has no BLAS library to choose
    measure._prefer_blas(config_by_name("fast_mb32_keep_input_fp16"), cuda=True)  # "": PyTorch's default, untouched
    assert chosen == []
    measure._prefer_blas(lt, cuda=True)
    assert chosen == ["cublaslt"]
    with pytest.raises(ValueError, match=r"blas='cublass'.*cublaslt"):
        measure._prefer_blas(replace(lt, blas="cublass"), cuda=True)
    # a result file written before the field existed reads back with PyTorch's default
    old_row = {k: v for k, v in vars(lt).items() if k != "blas"}
    assert BenchConfig.from_dict(old_row).blas == ""
