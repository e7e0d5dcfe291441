"""Notebook 04's GPU campaign: the runs a 2-core CPU cannot make, started together on one GPU, then summarised.

    QLORA_COMMIT=$(git rev-parse HEAD) .venv/bin/python tools/gpu_campaign/run.py --out runs/gpu_campaign
    .venv/bin/python tools/gpu_campaign/run.py --out runs/gpu_campaign --only random,group_by_length
    .venv/bin/python tools/gpu_campaign/run.py --out runs/gpu_campaign --dry-run     # print the commands only

Each run of ``utils.training.campaign.CAMPAIGN_RUNS`` is its own ``python -m utils.training`` process writing
``<out>/<run>/`` (log in ``<out>/<run>.log``); they start at once and share the GPU (the embedded model needs
well under 1 GiB each). Needs a CUDA GPU and the embedded model prepared (``make prepare``). When every run has
finished, ``python -m utils.training summarize-campaign <out> --out results/04_gpu_campaign.json`` writes the JSON
notebook 04 reads; commit it with its log. A run that crashed is rerun by the same command (it resumes).

Measured on an H200 (issue #18): the thesis recipe on the embedded model runs 2000 steps in about 10 minutes, so
the whole campaign takes about a quarter of an hour.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from utils.training.campaign import CAMPAIGN_FILE, CAMPAIGN_RUNS, campaign_command, summarize_campaign  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: output folder, which runs, where the summary goes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the run folders and their logs")
    parser.add_argument("--only", default="", help=f"comma-separated runs (default all: {', '.join(CAMPAIGN_RUNS)})")
    parser.add_argument("--summary", default=str(CAMPAIGN_FILE), help="JSON written when every run finished")
    parser.add_argument("--extra", default="", help="flags added to every run (e.g. '--seed 1')")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (only to try the script)")
    return parser.parse_args(argv)


def selected_runs(only: str) -> list[str]:
    """The runs named in ``--only`` (all when empty); an unknown name stops with the known ones."""
    names = [n.strip() for n in only.split(",") if n.strip()] or list(CAMPAIGN_RUNS)
    unknown = [n for n in names if n not in CAMPAIGN_RUNS]
    if unknown:
        raise SystemExit(f"error: unknown runs {unknown}; the campaign's runs are {', '.join(CAMPAIGN_RUNS)}")
    return names


def start_runs(names: list[str], out: Path, extra: tuple[str, ...]) -> dict[str, tuple[subprocess.Popen, IO]]:
    """Start every run as its own process (output to ``<out>/<run>.log``); return (process, log) by name."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = {}
    for name in names:
        command = campaign_command(name, out, extra)
        log = open(out / f"{name}.log", "w", encoding="utf-8")  # closed by main once the process ended
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[name] = (process, log)
        print(f"started {name} (pid {process.pid}): {out / name}")
    return started


def main(argv: list[str] | None = None) -> int:
    """Start the runs, wait for them, summarise when all finished; 1 when one failed."""
    args = parse_args(argv)
    names, out, extra = selected_runs(args.only), Path(args.out).resolve(), tuple(shlex.split(args.extra))
    if args.dry_run:
        for name in names:
            print(shlex.join(campaign_command(name, out, extra)))
        return 0
    import torch  # only a real run needs it

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("error: no CUDA GPU here; the campaign is meant for one (--allow-cpu only to try the script)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failed = []
    for name, (process, log) in start_runs(names, out, extra).items():
        code = process.wait()
        log.close()
        print(f"{name}: exit {code} after {time.perf_counter() - start:.0f} s (log: {out / name}.log)")
        if code:
            failed.append(name)
    if failed:
        print(f"error: {', '.join(failed)} failed; read the logs, then rerun the same command (it resumes)")
        return 1
    print(f"summary: {summarize_campaign(out, args.summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
