"""Command line of notebook 02's measurements: ``gpu-report`` (measure the twin) and ``child`` (one task).

    python -m utils.memory gpu-report --out results/02_twin_gpu_memory.json
    python -m utils.memory gpu-report --out /tmp/x.json --tiny     # the same logic on a tiny twin (CPU)
"""

from __future__ import annotations

import argparse
import sys

import torch

from utils.childproc import serve_child
from utils.memory.gpu_report import gpu_report
from utils.memory.tasks import run_task
from utils.paths import resolve_path


def build_parser() -> argparse.ArgumentParser:
    """``gpu-report`` and the internal ``child`` sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m utils.memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("gpu-report", help="measure the Llama-3.2-3B twin on this machine's GPU")
    rep.add_argument("--out", required=True, help="JSON file to write, e.g. results/02_twin_gpu_memory.json")
    rep.add_argument("--tiny", action="store_true", help="a 2-layer twin: tests the logic in a minute on a CPU")
    rep.add_argument("--folder", help="where to save the bf16 twin (default: a temporary folder)")
    rep.add_argument("--steps", type=int, default=3, help="measured optimizer steps per training configuration")
    rep.add_argument("--jobs", type=int, default=3, help="weight measurements run side by side (own processes)")
    child = sub.add_parser("child", help="internal: run one measurement task given as JSON")
    child.add_argument("task")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; ``gpu-report`` without a GPU (and without ``--tiny``) is one clear error."""
    args = build_parser().parse_args(argv)
    if args.command == "child":
        return serve_child(args.task, run_task)
    if not torch.cuda.is_available() and not args.tiny:
        print("error: gpu-report needs a CUDA GPU (torch.cuda.is_available() is False here). "
              "Run it on a GPU machine, or pass --tiny to test the logic on this CPU.", file=sys.stderr)
        return 1
    gpu_report(resolve_path(args.out), tiny=args.tiny, folder=args.folder, steps=args.steps, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
