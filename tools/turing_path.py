"""The Turing path (RTX 20xx) on a newer GPU: does the fast path train as the standard forward does, within seed noise?

Every run trains the embedded model with the thesis recipe (``--profile gpu``, or ``thesis`` until that profile
exists) for 300 steps, validation loss every 100 on the whole validation split, as its own
``python -m utils.training`` process with ``QLORA_EMULATE_CAPABILITY=7.5``: the GPU takes the decisions a
Turing card takes (fp16 instead of bf16, SDPA without FlashAttention, inside the fast path and outside it). The
runs start at once and share the GPU (the embedded model needs well under 1 GiB each)::

    QLORA_COMMIT=$(git rev-parse HEAD) .venv/bin/python tools/turing_path.py            # GPU: ~10 minutes
    .venv/bin/python tools/turing_path.py --dry-run                                     # print the commands only
    .venv/bin/python tools/turing_path.py --smoke --out /tmp/turing.json                # CPU: 2 steps, no emulation

Runs (``runs/turing/<name>/``, log in ``runs/turing/<name>.log``): the fast path on and off with seeds 42 and 43,
the fast path with its kernels forced to PyTorch ops (``fast_path_kernels='torch'``: what Windows without
Triton/Liger runs) and, where Liger can run, forced to Liger's Triton kernels (with the thesis's 2 × 512 tokens per
pass, ``auto`` already picks PyTorch's ops: see ``FastPathOptions.small_pass_tokens``). When all have finished,
``results/gpu/04_turing_path.json`` gets each run's settings, resolved fast path, wall time and losses, and the
comparison: the on/off gaps in final validation loss and mean per-step training loss, against the seed-to-seed
gaps of the same path. A run that crashed is rerun with ``--only <run>`` (it resumes); the summary then takes the
other runs' finished folders as they are.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from utils.device import EMULATE_CAPABILITY_ENV  # noqa: E402
from utils.files import read_json, save_json  # noqa: E402
from utils.paths import CONFIG_FILE, PARAMS_DIR, RESULTS_DIR, RUNS_DIR, resolve_path  # noqa: E402
from utils.provenance import command_line, result_provenance  # noqa: E402
from utils.training.campaign import HISTORY_FILE, RUN_FILE, history_records, summarize_run  # noqa: E402

OUT_FILE = RESULTS_DIR / "gpu" / "04_turing_path.json"
WORK_DIR = RUNS_DIR / "turing"
EMULATED = "7.5"  # the RTX 2070 SUPER of the thesis (Turing)
STEPS, EVAL_STEPS = 300, 100
SEEDS = (42, 43)

# The GPU run: the thesis recipe as the profile sets it, only shortened and evaluated more often.
GPU_ARGS = ("--max-steps", str(STEPS), "--eval-steps", str(EVAL_STEPS), "--eval-limit", "0",
            "--save-steps", str(STEPS), "--logging-steps", "1")
# The CPU smoke run (no CUDA, so no emulation): two steps on a handful of examples, to try the whole script.
SMOKE_ARGS = ("--max-steps", "2", "--warmup-steps", "0", "--eval-steps", "1", "--eval-limit", "2",
              "--train-limit", "8", "--save-steps", "2", "--logging-steps", "1", "--max-seq-length", "256",
              "--no-gradient-checkpointing")


@dataclass(frozen=True)
class Run:
    """One training run of the comparison: the fast path's setting, its kernels, the seed."""

    name: str
    fast_path: str  # "on" | "off"
    seed: int
    kernels: str = "auto"  # fast_path_kernels
    needs_liger: bool = False

    def flags(self) -> tuple[str, ...]:
        kernels = ("--fast-path-kernels", self.kernels) if self.fast_path == "on" else ()
        return ("--fast-path", self.fast_path, *kernels, "--seed", str(self.seed))


RUNS: dict[str, Run] = {r.name: r for r in (
    Run("on_s42", "on", 42),
    Run("off_s42", "off", 42),
    Run("on_torch_s42", "on", 42, kernels="torch"),
    Run("on_liger_s42", "on", 42, kernels="liger", needs_liger=True),
    Run("off_s43", "off", 43),
    Run("on_s43", "on", 43),
)}


def default_profile() -> str:
    """``gpu`` when its profile exists (notebooks/params/gpu.yaml), else ``thesis`` (the same recipe)."""
    return "gpu" if (PARAMS_DIR / "gpu.yaml").is_file() else "thesis"


def run_command(run: Run, work: Path, profile: str, smoke: bool) -> list[str]:
    """The ``python -m utils.training`` command of ``run``, writing into ``work/<name>``."""
    return [sys.executable, "-m", "utils.training", "--profile", profile, "--model", "embedded",
            *(SMOKE_ARGS if smoke else GPU_ARGS), *run.flags(), "--output-dir", str(work / run.name)]


def run_env(emulate: str | None, smoke: bool) -> dict[str, str]:
    """The children's environment: the emulated capability (when given), unbuffered logs, one thread in smoke."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(EMULATE_CAPABILITY_ENV, None)
    if emulate:
        env[EMULATE_CAPABILITY_ENV] = emulate
    if smoke:  # several processes on a few shared cores: no OpenMP threads spinning against each other
        env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


@dataclass
class Started:
    """A launched run: its process, log and start time."""

    run: Run
    process: subprocess.Popen
    log: IO
    start: float
    command: list[str] = field(default_factory=list)


def start_runs(runs: list[Run], work: Path, profile: str, smoke: bool, env: dict[str, str]) -> list[Started]:
    """Start every run as its own process at once (output to ``work/<name>.log``)."""
    started = []
    for run in runs:
        command = run_command(run, work, profile, smoke)
        log = open(work / f"{run.name}.log", "w", encoding="utf-8")  # closed by wait_runs
        log.write(f"$ {EMULATE_CAPABILITY_ENV}={env.get(EMULATE_CAPABILITY_ENV, '')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(Started(run, process, log, time.perf_counter(), command))
        print(f"started {run.name} (pid {process.pid}): {work / run.name}", flush=True)
    return started


def wait_runs(started: list[Started]) -> dict[str, dict[str, Any]]:
    """Wait for every run; (exit code, wall seconds of its process) by name."""
    done = {}
    for item in started:
        code = item.process.wait()
        item.log.close()
        wall = round(time.perf_counter() - item.start, 1)
        done[item.run.name] = {"exit_code": code, "wall_s": wall, "command": shlex.join(item.command)}
        print(f"{item.run.name}: exit {code} after {wall:.0f} s", flush=True)
    return done


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------


def _series(history: list[dict[str, Any]], column: str) -> list[list[float]]:
    """[[step, value], ...] of a logged column (train ``loss`` or ``eval_loss``), in step order, values present."""
    points = {int(row["step"]): float(row[column]) for row in history
              if row.get(column) is not None and row.get("step") is not None}
    return [[step, round(points[step], 6)] for step in sorted(points)]


def summarize_turing_run(folder: Path, process: dict[str, Any] | None = None) -> dict[str, Any]:
    """One finished run: settings, what the fast path resolved to, capability, wall time and its losses."""
    base = summarize_run(folder)  # utils.training.campaign: provenance, settings, plan, training, history
    config = read_json(folder / CONFIG_FILE)
    parameters, plan = config.get("parameters", {}), config.get("plan", {})
    train, evals = _series(base["history"], "loss"), _series(base["history"], "eval_loss")
    return {
        "settings": {**base["settings"], "fast_path_kernels": parameters.get("fast_path_kernels"),
                     "quantization": parameters.get("quantization"), "compute_dtype": parameters.get("compute_dtype")},
        "plan": {**base["plan"], "attn_implementation": plan.get("attn_implementation")},
        "fast_path_resolved": plan.get("fast_path_resolved"),
        "compute_capability": plan.get("compute_capability"),
        "emulated_from": plan.get("emulated_from"),
        "device_name": base["device_name"],
        "commit": base["commit"],
        "command": base["command"],
        "wall_s": (process or {}).get("wall_s"),
        "train_wall_s": base["wall_time_s"],
        "training": base["training"],
        "train_losses": train,
        "eval_losses": evals,
        "final_eval_loss": evals[-1][1] if evals else None,
    }


def summarize_partial_run(folder: Path) -> dict[str, Any]:
    """A run stopped before its end (no ``04_run.json``): its settings and the losses it logged."""
    config = read_json(folder / CONFIG_FILE)
    history = history_records(folder / HISTORY_FILE)
    train, evals = _series(history, "loss"), _series(history, "eval_loss")
    parameters = config.get("parameters", {})
    return {"settings": {k: parameters.get(k) for k in ("fast_path", "fast_path_kernels", "seed", "max_steps")},
            "fast_path_resolved": config.get("plan", {}).get("fast_path_resolved"),
            "stopped_at_step": train[-1][0] if train else 0, "train_losses": train, "eval_losses": evals,
            "final_eval_loss": None}


def early_steps_comparison(runs: dict[str, dict[str, Any]], partial: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison over the first steps every run (finished or stopped) logged: training loss only."""
    every = {**runs, **partial}
    last = min(r["train_losses"][-1][0] for r in every.values() if r["train_losses"])
    cut = {name: {**r, "train_losses": [p for p in r["train_losses"] if p[0] <= last], "final_eval_loss": None}
           for name, r in every.items()}
    result = comparison(cut)
    return {"steps": last, "note": f"training loss over steps 1-{last}, the steps every run logged "
                                   "(validation loss is only at step 0 there)", **result}


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """|a − b| in final validation loss, and the mean |a − b| of the training loss over the steps both logged."""
    a_steps, b_steps = dict(map(tuple, a["train_losses"])), dict(map(tuple, b["train_losses"]))
    shared = sorted(set(a_steps) & set(b_steps))
    final = (abs(a["final_eval_loss"] - b["final_eval_loss"])
             if a["final_eval_loss"] is not None and b["final_eval_loss"] is not None else None)
    step_gap = sum(abs(a_steps[s] - b_steps[s]) for s in shared) / len(shared) if shared else None
    return {"final_eval_loss_gap": None if final is None else round(final, 6),
            "mean_step_train_loss_gap": None if step_gap is None else round(step_gap, 6),
            "steps_compared": len(shared)}


def _within(gaps: list[dict[str, Any]], noise: list[dict[str, Any]], key: str) -> bool | None:
    """Whether every gap of ``gaps`` is at most the largest gap of ``noise`` (None when a value is missing)."""
    values, limits = [g[key] for g in gaps], [n[key] for n in noise]
    if not values or not limits or None in values or None in limits:
        return None
    return max(values) <= max(limits)


RULE = ("agree within seed noise: every gap between the two paths (or kernel sets) at equal seed is at most the "
        "largest seed-to-seed gap (seed 42 vs 43) of one path, for the final validation loss and for the mean "
        "per-step training loss separately")


def comparison(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The on/off and kernel gaps against the seed-to-seed gaps, and whether they agree within seed noise."""
    pairs = {
        "on_vs_off_s42": ("on_s42", "off_s42"),
        "on_vs_off_s43": ("on_s43", "off_s43"),
        "seed42_vs_seed43_fast_path_on": ("on_s42", "on_s43"),
        "seed42_vs_seed43_fast_path_off": ("off_s42", "off_s43"),
        "kernels_torch_vs_auto_s42": ("on_torch_s42", "on_s42"),
        "kernels_liger_vs_auto_s42": ("on_liger_s42", "on_s42"),
    }
    gaps = {name: {"runs": [a, b], **compare_runs(runs[a], runs[b])}
            for name, (a, b) in pairs.items() if a in runs and b in runs}
    noise = [gaps[k] for k in ("seed42_vs_seed43_fast_path_on", "seed42_vs_seed43_fast_path_off") if k in gaps]
    verdicts = {}
    for label, keys in (("fast_path_on_vs_off", ("on_vs_off_s42", "on_vs_off_s43")),
                        ("kernels_torch_vs_auto", ("kernels_torch_vs_auto_s42",)),
                        ("kernels_liger_vs_auto", ("kernels_liger_vs_auto_s42",))):
        measured = [gaps[k] for k in keys if k in gaps]
        if not measured:
            continue
        final = _within(measured, noise, "final_eval_loss_gap")
        steps = _within(measured, noise, "mean_step_train_loss_gap")
        verdicts[label] = {"final_eval_loss": final, "mean_step_train_loss": steps,
                           "agree_within_seed_noise": None if None in (final, steps) else final and steps}
    return {"rule": RULE, "gaps": gaps, "verdicts": verdicts}


def script_argv() -> list[str]:
    """This script's command line with its path relative to the repository (``tools/turing_path.py --smoke``)."""
    script = Path(sys.argv[0]).resolve()
    head = str(script.relative_to(REPO_ROOT)) if script.is_relative_to(REPO_ROOT) else sys.argv[0]
    return [head, *sys.argv[1:]]


def earlier_runs(out: Path, exclude: set[str]) -> dict[str, dict[str, Any]]:
    """The finished runs of an earlier summary at ``out`` that this one did not rerun (``--only`` on another
    machine, whose run folders are gone): each keeps its own commit and record, with ``carried_from`` naming the
    earlier summary's date."""
    if not out.is_file():
        return {}
    earlier = read_json(out)
    return {name: {**record, "carried_from": record.get("carried_from") or earlier.get("date")}
            for name, record in earlier.get("runs", {}).items() if name in RUNS and name not in exclude}


def summarize_turing(work: Path, out: Path, processes: dict[str, dict[str, Any]], profile: str,
                     emulate: str | None, smoke: bool, skipped: dict[str, str],
                     provenance_from_runs: bool = False) -> Path:
    """``out`` (JSON, atomic): provenance, every finished run of ``work`` and the comparison.

    Runs of an earlier invocation that finished (``--only`` reran the others) are summarised too, from their
    folders in ``work`` or, when those are gone, from the summary already at ``out`` (``carried_over`` names
    them); ``wall_s`` (the process's wall time) is known for this invocation's runs only. Runs stopped before their end (a log
    history, no run record) go to ``partial_runs``, with a comparison over the first steps every run logged.
    ``provenance_from_runs``: date, device, commit and versions from the runs' records (``--summarize-only`` on
    another machine).
    """
    finished = [name for name in RUNS if name in processes or (work / name / RUN_FILE).is_file()]
    runs = {name: summarize_turing_run(work / name, processes.get(name)) for name in finished}
    carried = earlier_runs(out, exclude=set(runs))
    runs = {name: (runs.get(name) or carried[name]) for name in RUNS if name in runs or name in carried}
    partial = {name: summarize_partial_run(work / name) for name in RUNS
               if name not in runs and (work / name / HISTORY_FILE).is_file()}
    provenance = result_provenance(command_line(["python", *script_argv()]))
    if provenance_from_runs and runs:
        # summarised on another machine than the one that trained: the runs' own records say where and when
        record = read_json(work / next(iter(runs)) / RUN_FILE)
        provenance.update({k: record.get(k) for k in ("device", "commit", "versions", "compute_capability")},
                          date=record.get("started_at"), summarized_at=provenance["date"])
    summary = {
        "what": ("Turing path: the thesis recipe on the embedded model for a few hundred steps, fast path on and "
                 "off, kernels auto / torch / liger, two seeds, under an emulated compute capability "
                 "(tools/turing_path.py)"),
        "date": provenance["date"],
        "device": provenance["device"],
        "compute_capability": provenance.get("compute_capability"),
        "emulated_capability": emulate,
        "commit": provenance["commit"],
        "command": provenance["command"],
        "versions": provenance["versions"],
        "profile": profile,
        "smoke": smoke,
        "steps": max((r["training"].get("global_step") or 0 for r in runs.values()), default=0),
        "skipped": skipped,
        "runs": runs,
        "comparison": comparison(runs),
    }
    if carried:
        summary["carried_over"] = {name: {"commit": r.get("commit"), "from": r.get("carried_from")}
                                   for name, r in carried.items()}
    if partial:
        summary["partial_runs"] = partial
        summary["early_steps_comparison"] = early_steps_comparison(runs, partial)
    if provenance_from_runs:
        summary["summarized_at"] = provenance.get("summarized_at")
    return save_json(summary, out)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Output folder and file, which runs, the capability to emulate, smoke mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help=f"run folders and logs (default {WORK_DIR}; smoke: "
                                                         f"{WORK_DIR}-smoke)")
    parser.add_argument("--out", default=None, help=f"summary JSON (default {OUT_FILE}; smoke: "
                                                    "<work-dir>/04_turing_path.json)")
    parser.add_argument("--only", default="", help=f"comma-separated runs (default all: {', '.join(RUNS)})")
    parser.add_argument("--profile", default=None, help="profile of the recipe (default: gpu if it exists, else "
                                                        "thesis; smoke: smoke)")
    parser.add_argument("--emulate", default=EMULATED, help=f"compute capability to emulate (default {EMULATED}; "
                                                            "'' for the GPU's own)")
    parser.add_argument("--smoke", action="store_true", help="2 steps on a few examples, on the CPU if there is no "
                                                             "GPU (no emulation there): tries the whole script")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--summarize-only", action="store_true",
                        help="start nothing: summarise the run folders of --work-dir (e.g. copied back from the GPU "
                             "machine), with the date, device and versions of the runs' own records")
    args = parser.parse_args(argv)
    args.work_dir = resolve_path(args.work_dir) if args.work_dir else (
        WORK_DIR.with_name(WORK_DIR.name + "-smoke") if args.smoke else WORK_DIR)
    args.out = resolve_path(args.out) if args.out else (
        args.work_dir / OUT_FILE.name if args.smoke else OUT_FILE)
    args.profile = args.profile or ("smoke" if args.smoke else default_profile())
    return args


def selected_runs(only: str) -> list[Run]:
    """The runs named in ``--only`` (all when empty); an unknown name stops with the known ones."""
    names = [n.strip() for n in only.split(",") if n.strip()] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown runs {unknown}; the Turing path's runs are {', '.join(RUNS)}")
    return [RUNS[n] for n in names]


def check_emulation(emulate: str | None) -> str | None:
    """The capability to emulate, checked against this GPU (one error when it is malformed or above it)."""
    from utils.device import CapabilityEmulationError, compute_capability

    if not emulate:
        return None
    os.environ[EMULATE_CAPABILITY_ENV] = emulate  # this process's provenance records it too
    try:
        compute_capability()
    except CapabilityEmulationError as exc:
        raise SystemExit(f"error: {exc}") from None
    return emulate


def main(argv: list[str] | None = None) -> int:
    """Start the runs, wait for them, summarise when all finished; 1 when one failed."""
    args = parse_args(argv)
    runs = selected_runs(args.only)
    if args.summarize_only:
        path = summarize_turing(args.work_dir, args.out, {}, args.profile, args.emulate or None, args.smoke, {},
                                provenance_from_runs=True)
        print(f"summary: {path}")
        return 0
    if args.dry_run:
        for run in runs:
            print(shlex.join(run_command(run, args.work_dir, args.profile, args.smoke)))
        return 0
    import torch  # only a real run needs it

    from utils.modeling import prepare_embedded_model
    from utils.speed.fastpath import liger_available

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA GPU here; the Turing path is emulated on one (--smoke tries the script on "
                         "a CPU)")
    emulate = check_emulation(args.emulate) if cuda else None
    if not emulate:
        os.environ.pop(EMULATE_CAPABILITY_ENV, None)
    skipped = {r.name: "Liger's Triton kernels cannot run here (CUDA + liger-kernel + triton)"
               for r in runs if r.needs_liger and not liger_available()}
    runs = [r for r in runs if r.name not in skipped]
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    prepare_embedded_model()  # once, before the runs: they would all convert it at the same time
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = run_env(emulate, args.smoke)
    processes = wait_runs(start_runs(runs, args.work_dir, args.profile, args.smoke, env))
    failed = [name for name, p in processes.items()
              if p["exit_code"] or not (args.work_dir / name / RUN_FILE).is_file()]
    if failed:
        print(f"error: {', '.join(failed)} failed; read {args.work_dir}/<run>.log, then rerun them with "
              f"--only {','.join(failed)} (they resume; the summary takes the finished runs as they are)")
        return 1
    path = summarize_turing(args.work_dir, args.out, processes, args.profile, emulate, args.smoke, skipped)
    verdicts = read_json(path)["comparison"]["verdicts"]
    print(f"summary: {path}")
    for label, verdict in verdicts.items():
        print(f"  {label}: agree within seed noise = {verdict['agree_within_seed_noise']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
