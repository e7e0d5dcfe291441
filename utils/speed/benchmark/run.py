"""The whole benchmark: every configuration in its own process, the correctness runs, and the multi-GPU runs.

Each writes one JSON report (rewritten after every row, so a run stopped by a time limit keeps what it measured)
that records the commit and the command (``utils.provenance.result_provenance``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from utils.config import THESIS
from utils.device import default_device
from utils.files import read_json, save_json
from utils.modeling import build_tiny_twin, build_twin, load_tokenizer
from utils.paths import REPO_ROOT
from utils.provenance import result_provenance
from utils.speed.benchmark.configs import CONFIGS, CONFIGS_BY_NAME, BenchConfig, config_by_name
from utils.speed.benchmark.measure import run_child
from utils.speed.benchmark.strict import (
    BUDGETS,
    DEFAULT_ALLOC_CONF,
    STRICT8_ROWS,
    alloc_env,
    strict_configs,
    strict_method,
    strict_rules,
    strict_summary,
)
from utils.speed.results import compare_losses, summarize

TWIN_LABEL = "llama-3.2-3b-twin (random weights, exact Llama-3.2-3B architecture)"
EXPANDABLE = alloc_env("expandable_segments:True")


def save_twin(folder: Path, tiny: bool, device: str) -> dict:
    """Write the random-weight twin (bf16 safetensors) once; every configuration loads it."""
    if (folder / "config.json").exists():
        return {"folder": str(folder), "reused": True}
    start = time.perf_counter()
    if tiny:
        model = build_tiny_twin(device)
    else:
        model = build_twin(device=device, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    if not tiny:  # a complete local model: `python -m utils.training --model <folder>` finds its tokenizer
        load_tokenizer("llama-3.2").save_pretrained(folder)
    del model
    if device.startswith("cuda"):  # the children measure the GPU: leave them only this process's context on it
        torch.cuda.empty_cache()
    return {"folder": str(folder), "seconds": round(time.perf_counter() - start, 1)}


def _benchmark_method(steps: int, warmup: int, repeat: int, repeat_only: Sequence[str] | None,
                      memory_cap_gib: float | None) -> str:
    """How the rows of a run were measured, in one paragraph (the report's ``method``)."""
    return (f"Each configuration in a fresh process on the same GPU, one after another: {warmup} warm-up "
            f"optimizer steps, then the median of {steps}; tokens/s = real (non-padding) tokens of the "
            "measured steps / their seconds; peaks = torch.cuda.max_memory_allocated / max_memory_reserved "
            "over all steps. LoRA r=32, alpha=64 on q,k,v,o,gate,up,down; clip 0.5; GradScaler for fp16. "
            "Synthetic rows: fixed random ids, 512 tokens, no padding. Corpus rows: the shipped training "
            "examples (Llama-3.2 chat template, completion-only labels)."
            + (f" The list ran {repeat} times, round robin"
               + (f" ({', '.join(repeat_only)} only, after the first round)" if repeat_only else "")
               + "; the summary takes each configuration's median." if repeat > 1 else "")
            + (f" Every row ran with PyTorch's caching allocator capped at {memory_cap_gib} GiB "
               "(torch.cuda.set_per_process_memory_fraction), as on an 8 GB card: past the cap it returns "
               "cached blocks and retries (allocator.num_alloc_retries) or fails out of memory."
               if memory_cap_gib else ""))


def _print_row(config: BenchConfig, row: dict) -> None:
    """One line per measured row: tokens/s, s/step, peaks, first and last loss (or the error); the budget's use."""
    if row.get("ok"):
        print(f"[benchmark] {config.name:>30}: {row['tokens_per_second']:>9,.0f} tokens/s  "
              f"{row['seconds_per_step']:.4f} s/step  peak {row.get('peak_allocated_gib')} GiB alloc / "
              f"{row.get('peak_reserved_gib')} GiB reserved  loss {row['first_loss']:.3f} -> "
              f"{row['last_loss']:.3f}  alloc retries {(row.get('allocator') or {}).get('num_alloc_retries')}",
              flush=True)
    else:
        print(f"[benchmark] {config.name:>30}: {row.get('error')}", flush=True)
    use = row.get("budget")
    if use:
        print(f"[benchmark] {'':>30}  budget: {use['peak_reserved_gib']} reserved + {use['outside_allocator_gib']} "
              f"outside the allocator (paged optimizer {use['paged_optimizer_gib']}) + {use['cuda_context_gib']} "
              f"context = {use['device_gib']} of {use['device_limit_gib']} GiB; pinned {use['pinned_host_gib']} of "
              f"{use['pinned_limit_gib']} GiB: " + ("within" if use["in_budget"] else "OUT: " + "; ".join(use["over"])),
              flush=True)


def _configs_to_run(names: Sequence[str] | None, device: str) -> list[BenchConfig]:
    """The configurations called ``names`` (all by default); on a CPU, small and without Unsloth or Liger."""
    configs = [config_by_name(n) for n in names] if names else CONFIGS
    if device == "cpu":
        configs = [replace(c, micro_batch=min(c.micro_batch, 2), max_seq_length=64) for c in configs
                   if c.impl != "unsloth" and not c.liger]
    return configs


def _checked_names(names: Sequence[str] | None, repeat: int, repeat_only: Sequence[str] | None,
                   budget: str | None, memory_cap_gib: float | None) -> Sequence[str] | None:
    """The configurations to run (``STRICT8_ROWS`` by default under the strict budget), after one clear error for
    an impossible combination of options."""
    if repeat < 1:
        raise SystemExit(f"--repeat {repeat}: use 1 or more.")
    if budget is not None and budget not in BUDGETS:
        raise SystemExit(f"--budget {budget}: use one of {', '.join(BUDGETS)}.")
    if budget and memory_cap_gib:
        raise SystemExit(f"--memory-cap-gib {memory_cap_gib} and --budget {budget}: the budget sets each row's cap "
                         "itself (the card less the measured CUDA context and the display reserve); drop "
                         "--memory-cap-gib.")
    if budget and not names:
        names = list(STRICT8_ROWS)
    unknown = sorted(set(repeat_only or ()) - set(names or CONFIGS_BY_NAME))
    if unknown:
        raise SystemExit(f"--repeat-only {','.join(unknown)}: not in the list of configurations to run.")
    return names


def run_benchmark(out: Path, names: Sequence[str] | None = None, steps: int = 8, warmup: int = 3,
                  tiny: bool = False, twin_folder: str | None = None, timeout: float = 900,
                  memory_cap_gib: float | None = None, repeat: int = 1,
                  repeat_only: Sequence[str] | None = None, budget: str | None = None,
                  alloc_conf: str = DEFAULT_ALLOC_CONF, resume: bool = False) -> dict:
    """Measure every configuration (or ``names``) in its own process; write the JSON after every row.

    ``memory_cap_gib``: every row runs with the GPU allocator capped there (see ``measure``), like an 8 GB card.
    ``repeat``: run the whole list that many times, round robin, so that slow spells of a shared host fall on
    every configuration alike; the summary takes each configuration's median (``merged_rows``).
    ``repeat_only``: only these configurations run again after the first round (the host-bound ones, whose
    time moves with the host's load; the GPU-bound rows are steady within ±1 %).
    ``budget="strict8"``: every row under the strict 8 GB rules (``strict``; ``names`` default to ``STRICT8_ROWS``),
    all under the allocator setting ``alloc_conf``; the report adds ``budget`` (the rules) and ``strict``.
    ``resume``: ``out`` holds the rows of this same run stopped by a time limit; measure only the rows it lacks, in
    the same order (each start is listed in ``resumed``).
    """
    names = _checked_names(names, repeat, repeat_only, budget, memory_cap_gib)
    device = str(default_device())
    configs = _configs_to_run(names, device)
    rules = strict_rules(alloc_conf) if budget else None
    if budget:
        configs = strict_configs(configs, alloc_conf)
    folder = Path(twin_folder or tempfile.mkdtemp(prefix="twin-"))
    started = time.perf_counter()
    print(f"[benchmark] device {device}; twin in {folder}; {len(configs)} configurations", flush=True)
    twin = save_twin(folder, tiny, device)
    report: dict[str, Any] = {
        "label": TWIN_LABEL if not tiny else "tiny twin (logic test, not a result)",
        **result_provenance(), "twin": twin,
        "method": _benchmark_method(steps, warmup, repeat, repeat_only, memory_cap_gib)
        + (strict_method(rules) if rules else ""),
        "memory_cap_gib": memory_cap_gib,
        **({"budget": rules} if rules else {}),
        "repeat": repeat,
        "rows": [],
    }
    rounds = [(i, c) for i in range(repeat) for c in configs if i == 0 or not repeat_only or c.name in repeat_only]
    report["plan"] = [[i, c.name] for i, c in rounds]
    earlier = 0.0
    if resume:
        earlier = _resume(report, out)
        rounds = rounds[len(report["rows"]):]
        _summarize_into(report, rules)
        print(f"[benchmark] resuming {out}: {len(report['rows'])} rows there, {len(rounds)} to go", flush=True)
    for round_index, config in rounds:
        # strict: one allocator setting for every row (set explicitly, so the parent's own cannot leak into some)
        env = alloc_env(alloc_conf) if rules else EXPANDABLE if config.expandable_segments else {}
        task = {"config": asdict(config), "model": str(folder), "steps": steps, "warmup": warmup,
                "memory_cap_gib": memory_cap_gib, **({"budget": BUDGETS[budget]} if rules else {})}
        row = run_child(task, timeout, env)
        if repeat > 1:
            row["repeat"] = round_index
        report["rows"].append(row)
        _print_row(config, row)
        _summarize_into(report, rules)
        report["wall_seconds"] = round(earlier + time.perf_counter() - started, 1)
        save_json(report, out)
    _print_summaries(report)
    return report


def _summarize_into(report: dict, rules: dict | None) -> None:
    """The report's summary of its rows so far (and, under the strict budget, the strict comparison)."""
    report["summary"] = summarize(report["rows"])
    if rules:
        report["strict"] = strict_summary(report["rows"])


def _print_summaries(report: dict) -> None:
    print("[benchmark] summary " + json.dumps(report.get("summary"), indent=1), flush=True)
    if "strict" in report:
        print("[benchmark] strict budget " + json.dumps(report["strict"], indent=1), flush=True)


def _resume(report: dict, out: Path) -> float:
    """Take the rows of ``out`` (the same run, stopped) into ``report``; its wall seconds so far."""
    if not out.exists():
        raise SystemExit(f"--resume: {out} does not exist; run without --resume to start it.")
    earlier = read_json(out)
    for key in ("plan", "method", "budget"):
        if earlier.get(key) != report.get(key):
            raise SystemExit(f"--resume: {out} was written by another run (its {key} differs); give the same options "
                             "as the run that wrote it, or a new --out without --resume.")
    report["rows"] = earlier["rows"]
    report["resumed"] = [*earlier.get("resumed", []),
                         {k: report[k] for k in ("date", "commit", "command") if k in report}]
    for key in ("date", "commit", "command", "twin"):  # the first start's provenance stays the report's
        if key in earlier:
            report[key] = earlier[key]
    return float(earlier.get("wall_seconds", 0.0))


def run_correctness(out: Path, model: str = "embedded", steps: int = 50, seeds: Sequence[int] = (0, 1),
                    dtype: str = "fp16", timeout: float = 900) -> dict:
    """Train ``model`` ``steps`` steps on the corpus with both paths (same data order, each seed); losses."""
    report: dict[str, Any] = {
        "model": model, "steps": steps, "dtype": dtype, **result_provenance(),
        "method": ("Both paths see the same examples in the same order (2 per optimizer step; the original as "
                   "1 x 2 micro-batches, the fast path as one padding-free row), the same cosine schedule (10 % "
                   f"warm-up, lr {THESIS.learning_rate}), paged AdamW 8-bit; the seed sets LoRA init and dropout. "
                   "Loss = mean over the step's completion tokens."),
        "runs": [],
    }
    for seed in seeds:
        for name in ("original_corpus_fp16", "fast_2x1_corpus_fp16"):
            config = replace(config_by_name(name), dtype=dtype, name=f"{name.split('_')[0]}_seed{seed}")
            env = EXPANDABLE if config.expandable_segments else {}
            row = run_child({"config": asdict(config), "model": model, "steps": steps, "warmup": 0,
                             "lr_schedule": True, "seed": seed}, timeout, env)
            print(f"[correctness] {config.name}: " + (f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}, "
                  f"{row['seconds_per_step']:.3f} s/step" if row.get("ok") else row.get("error", "")), flush=True)
            report["runs"].append(row)
            save_json(report, out)
    report["comparison"] = compare_losses(report["runs"])
    save_json(report, out)
    print("[correctness] " + json.dumps(report["comparison"]), flush=True)
    return report


def ddp_command(gpus: int, model: str, output_dir: str, steps: int, batch: int) -> list[str]:
    """``python -m utils.training`` on one GPU, or under ``accelerate launch`` (DDP) on several."""
    args = ["-m", "utils.training", "--profile", "thesis", "--model", model, "--max-steps", str(steps),
            "--per-device-train-batch-size", str(batch), "--gradient-accumulation-steps", "1",
            "--warmup-steps", "5", "--eval-steps", "1000000", "--no-eval-on-start", "--save-steps", "1000000",
            "--logging-steps", "5", "--output-dir", output_dir]
    if gpus == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def _ddp_run(n: int, model: str, steps: int, batch: int, timeout: float) -> dict[str, Any]:
    """Train on ``n`` GPUs in a subprocess; the steady-state tokens/s and the rest of its run record."""
    folder = tempfile.mkdtemp(prefix=f"ddp{n}-")
    env = {**os.environ, **EXPANDABLE, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                                 os.environ.get("PYTHONPATH")]))}
    if n == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    cmd = ddp_command(n, model, folder, steps, batch)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    record = Path(folder) / "04_run.json"
    row: dict[str, Any] = {"gpus": n, "command": " ".join(cmd[1:]), "exit": proc.returncode,
                           "wall_seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0 and record.exists():
        training = read_json(record)["training"]
        row.update({k: training.get(k) for k in ("steady_tokens_per_second", "tokens_per_second", "world_size",
                                                 "global_step", "tokens_trained", "peak_memory_gib",
                                                 "first_train_loss", "last_train_loss")})
    else:
        row["error"] = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    print(f"[ddp] {n} GPU(s): " + (f"{row.get('steady_tokens_per_second')} tokens/s (steady), "
          f"{row.get('tokens_per_second')} overall" if "error" not in row else row["error"]), flush=True)
    return row


def run_ddp(out: Path, model: str, gpus: int = 2, steps: int = 30, batch: int = 64, timeout: float = 900) -> dict:
    """Steady-state training tokens/s on 1 GPU and on ``gpus`` GPUs (DDP), same per-GPU configuration."""
    report: dict[str, Any] = {
        "model": model, "steps": steps, "per_device_batch": batch, **result_provenance(),
        "gpu_count": torch.cuda.device_count(),
        "method": ("python -m utils.training (thesis profile: nf4_dq, LoRA r=32, paged AdamW 8-bit, fast path) with "
                   f"{batch} real examples per GPU per optimizer step; tokens/s = tokens seen by all ranks between "
                   "the end of step 3 and the last step / the seconds between them."),
        "runs": [],
    }
    for n in (1, gpus):
        report["runs"].append(_ddp_run(n, model, steps, batch, timeout))
        save_json(report, out)
    one, many = report["runs"][0].get("steady_tokens_per_second"), report["runs"][-1].get("steady_tokens_per_second")
    if one and many:
        report["speedup"] = round(many / one, 2)
        print(f"[ddp] speed-up {gpus} GPUs / 1 GPU: {report['speedup']}x", flush=True)
    save_json(report, out)
    return report
