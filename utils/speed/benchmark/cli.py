"""The command line of ``python -m utils.speed.benchmark``: run, correctness, correctness-large, ddp, profile, figure,
list (and child)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import torch

from utils.childproc import serve_child
from utils.config import THESIS
from utils.paths import resolve_path
from utils.plotting.speed import draw_figures
from utils.speed.benchmark.configs import CONFIGS, config_by_name
from utils.speed.benchmark.large_pass import (FLAT_OPTIM, LARGE_PASS_TASK, LargePassOptions, large_pass_child,
                                             run_large_pass_correctness, run_reference_comparison)
from utils.speed.benchmark.measure import child, run_child
from utils.speed.benchmark.run import EXPANDABLE, run_benchmark, run_correctness, run_ddp
from utils.speed.benchmark.strict import BUDGETS, DEFAULT_ALLOC_CONF, STRICT8_ROWS
from utils.speed.fastpath import KERNEL_CHOICES

DEFAULT_OUT = "results/04_speed_benchmark.json"
DEFAULT_CORRECTNESS_OUT = "results/04_fast_path_correctness.json"
DEFAULT_DDP_OUT = "results/04_ddp_scaling.json"
DEFAULT_LARGE_OUT = "results/04_large_pass_correctness.json"
PROG = "python -m utils.speed.benchmark"


def _names(text: str | None) -> list[str] | None:
    """A comma-separated command-line list of configuration names (None when not given)."""
    return [name.strip() for name in text.split(",")] if text else None


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="measure the configurations on this machine's GPU")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"JSON to write (default {DEFAULT_OUT})")
    run.add_argument("--only", help="comma-separated configuration names (default: all; see `list`)")
    run.add_argument("--steps", type=int, default=8, help="measured optimizer steps per configuration")
    run.add_argument("--warmup", type=int, default=3, help="warm-up optimizer steps per configuration")
    run.add_argument("--twin-folder", help="where the bf16 twin is saved (reused if present)")
    run.add_argument("--tiny", action="store_true", help="a 2-layer twin on the CPU: tests the logic")
    run.add_argument("--no-figure", action="store_true", help="write the JSON only")
    run.add_argument("--repeat", type=int, default=1, help="run the list this many times, round robin; the "
                     "summary takes each configuration's median (default 1)")
    run.add_argument("--repeat-only", help="comma-separated: only these configurations run again after the first "
                     "round (default: all)")
    run.add_argument("--memory-cap-gib", type=float, help="cap the GPU allocator of every row (e.g. 7.5: an 8 GB "
                     "card less its CUDA context)")
    run.add_argument("--budget", choices=tuple(BUDGETS), help="strict8: every row under the same 8 GB rules (cap = 8 "
                     "GiB - measured CUDA context - 0.5 GiB display reserve; paged optimizer and context counted; "
                     "<= 4 GiB pinned host memory; LoRA dropout 0.05; one --alloc-conf); default rows: "
                     + ",".join(STRICT8_ROWS))
    run.add_argument("--resume", action="store_true", help="--out holds this same run, stopped by a time limit: "
                     "measure only the rows it lacks, in the same order")
    run.add_argument("--alloc-conf", default=DEFAULT_ALLOC_CONF, help="with --budget: the allocator setting "
                     "(PYTORCH_ALLOC_CONF) of "
                     f"every row (default {DEFAULT_ALLOC_CONF})")


def _add_others(sub) -> None:
    cor = sub.add_parser("correctness", help="fast vs original loss on the embedded model")
    cor.add_argument("--out", default=DEFAULT_CORRECTNESS_OUT)
    cor.add_argument("--model", default="embedded")
    cor.add_argument("--steps", type=int, default=50)
    cor.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    cor.add_argument("--no-figure", action="store_true")
    _add_correctness_large(sub)
    ddp = sub.add_parser("ddp", help="training tokens/s on 1 GPU and on N GPUs (accelerate launch, DDP)")
    ddp.add_argument("--model", required=True, help="model folder or name (e.g. the saved twin)")
    ddp.add_argument("--gpus", type=int, default=2)
    ddp.add_argument("--steps", type=int, default=30)
    ddp.add_argument("--batch", type=int, default=64, help="examples per GPU per optimizer step")
    ddp.add_argument("--out", default=DEFAULT_DDP_OUT)
    fig = sub.add_parser("figure", help="redraw the figure of a saved JSON")
    fig.add_argument("json")
    sub.add_parser("list", help="list the configurations")
    prof = sub.add_parser("profile", help="profile one optimizer step of configurations (GPU kernels table)")
    prof.add_argument("names", help="comma-separated configuration names")
    prof.add_argument("--model", required=True, help="model folder (e.g. the saved twin) or name")
    prof.add_argument("--shapes", action="store_true", help="group the ops by input shape")
    prof.add_argument("--rows", type=int, default=30, help="table rows")
    prof.add_argument("--sort", choices=("gpu", "cpu"), default="gpu",
                      help="ops by GPU time, or by CPU time followed by a cProfile of Python functions")
    child_parser = sub.add_parser("child", help="internal: measure one configuration given as JSON")
    child_parser.add_argument("task")


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1`` as a list of whole numbers (argparse turns the ValueError into a usage error)."""
    return [int(seed) for seed in text.split(",") if seed.strip()]


def _add_correctness_large(sub) -> None:
    """``correctness-large``: the large-pass check of issue #20 (``large_pass``)."""
    large = sub.add_parser("correctness-large", help="fast path with Triton/Liger kernels forced and offloaded "
                           "checkpoints vs PEFT, at a large micro-batch, on the embedded model (GPU)")
    large.add_argument("--out", default=DEFAULT_LARGE_OUT, help=f"JSON to write (default {DEFAULT_LARGE_OUT})")
    large.add_argument("--model", default="embedded", help="model folder or name (default: embedded)")
    large.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    large.add_argument("--micro-batch", type=int, default=16, help="examples per optimizer step, one pass "
                       "(default 16)")
    large.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="compute dtype of both "
                       "paths (fp32: no autocast, the arithmetic the bf16/fp16 runs are rounded from; default bf16)")
    large.add_argument("--kernels", default="liger", choices=KERNEL_CHOICES, help="the fast path's kernel set "
                       "(default liger: Triton RoPE, Liger RMSNorm/SwiGLU on every pass)")
    large.add_argument("--no-offload", action="store_true", help="keep the fast path's checkpoints on the GPU")
    large.add_argument("--lora-dropout", type=float, default=THESIS.lora_dropout,
                       help=f"LoRA dropout of both paths (default {THESIS.lora_dropout}, the thesis's)")
    large.add_argument("--peft-noprep", action="store_true", help="PEFT without prepare_model_for_kbit_training "
                       "(no fp32 upcast: the residual stream in the compute dtype, as on the fast path)")
    large.add_argument("--fp32-residual", action="store_true", help="the fast path keeps its residual stream in "
                       "fp32, as PEFT after prepare_model_for_kbit_training's upcast")
    large.add_argument("--attention", default="auto", choices=("auto", "varlen", "sdpa"), help="the fast path's "
                       "attention (sdpa: one padded row per sequence, as PEFT; default auto: FlashAttention varlen)")
    large.add_argument("--loss", default="fused", choices=("fused", "torch"), help="the fast path's cross-entropy "
                       "(torch: PyTorch's, in chunks; default fused: Liger's fused linear cross-entropy)")
    large.add_argument("--fast-optim", default="flat", choices=("flat", "per-tensor"), help="the fast path's paged "
                       "AdamW 8-bit (per-tensor: bitsandbytes' own, as PEFT; default flat: one buffer)")
    large.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated seeds (default 0,1)")
    large.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    ref = sub.add_parser("large-pass-reference", help="each path of bf16 large-pass reports against an fp32 "
                         "one (correctness-large --dtype fp32): which path sits nearer the arithmetic it rounds")
    ref.add_argument("reports", nargs="+", help="correctness-large JSON files (bf16 or fp16)")
    ref.add_argument("--reference", required=True, help="the correctness-large --dtype fp32 JSON")
    ref.add_argument("--out", required=True, help="JSON to write")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(prog=PROG, description="Training speed, side by side: the original "
                                     "configuration and the fast path, each in its own process.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_others(sub)
    return parser


def _needs_gpu(what: str, hint: str = "") -> int:
    print(f"error: {what} needs a CUDA GPU (torch.cuda.is_available() is False here).{hint}", file=sys.stderr)
    return 1


def _print_figures(path) -> None:
    for figure in draw_figures(path):
        print(f"wrote {figure}")


def _list(args) -> int:
    for c in CONFIGS:
        print(f"{c.name:32} {c.impl:8} {c.dtype} {c.micro_batch}x{c.accumulation}x{c.max_seq_length} {c.workload}")
    return 0


def _profile(args) -> int:
    """Each configuration's profiled step in its own child process; its table printed here."""
    if not torch.cuda.is_available():
        return _needs_gpu("the profile times GPU kernels and")
    for name in _names(args.names):
        config = config_by_name(name)
        task = {"config": asdict(config), "model": args.model,
                "profile": {"rows": args.rows, "shapes": args.shapes, "sort": args.sort}}
        result = run_child(task, env=EXPANDABLE if config.expandable_segments else {})
        if "table" not in result:
            print(f"[profile] {name}: {result.get('error')}", file=sys.stderr)
            continue
        print(result["table"])
        print("STEP", result["seconds_per_step"], "GPU busy ms", result["gpu_busy_ms"])
    return 0


def _run(args) -> int:
    if not torch.cuda.is_available() and not args.tiny:
        return _needs_gpu("the benchmark", " Run it on a GPU machine, or pass --tiny to test the logic on this CPU.")
    out = resolve_path(args.out)
    run_benchmark(out, _names(args.only), args.steps, args.warmup, args.tiny, args.twin_folder,
                  memory_cap_gib=args.memory_cap_gib, repeat=args.repeat, repeat_only=_names(args.repeat_only),
                  budget=args.budget, alloc_conf=args.alloc_conf, resume=args.resume)
    if not args.no_figure:
        _print_figures(out)
    return 0


def _correctness(args) -> int:
    out = resolve_path(args.out)
    run_correctness(out, args.model, args.steps, dtype=args.dtype)
    if not args.no_figure:
        _print_figures(out)
    return 0


def _correctness_large(args) -> int:
    """Both paths per seed in child processes; one clear error (``SystemExit``) for a request it cannot answer."""
    options = LargePassOptions(
        dtype=args.dtype, kernels=args.kernels, offload=not args.no_offload, lora_dropout=args.lora_dropout,
        peft_prepare=not args.peft_noprep, fp32_residual=args.fp32_residual, attention=args.attention,
        fused_loss=args.loss == "fused", fast_optim=FLAT_OPTIM if args.fast_optim == "flat" else "paged_adamw_8bit")
    run_large_pass_correctness(resolve_path(args.out), args.model, args.steps, args.micro_batch, args.seeds, options,
                               args.timeout)
    return 0


def _large_pass_reference(args) -> int:
    report = run_reference_comparison(resolve_path(args.reference), [resolve_path(p) for p in args.reports],
                                      resolve_path(args.out))
    for name, rows in report["reports"].items():
        cells = ", ".join(f"{row} {v['mean_abs']:.4f} ({v['mean_signed']:+.4f})" for row, v in rows["rows"].items())
        print(f"[large-pass-reference] {name}: mean |Δ| (signed) from fp32 PEFT: {cells}; "
              f"fast nearer: {rows['fast_nearer']}", flush=True)
    return 0


def _child(task: dict) -> dict:
    """One child task: a large-pass correctness run (``large_pass``) or a benchmark measurement."""
    return large_pass_child(task) if task.get("kind") == LARGE_PASS_TASK else child(task)


def _ddp(args) -> int:
    run_ddp(resolve_path(args.out), args.model, args.gpus, args.steps, args.batch)
    return 0


def _figure(args) -> int:
    _print_figures(resolve_path(args.json))
    return 0


COMMANDS = {"list": _list, "profile": _profile, "run": _run, "correctness": _correctness,
            "correctness-large": _correctness_large,
            "large-pass-reference": _large_pass_reference, "ddp": _ddp, "figure": _figure,
            "child": lambda args: serve_child(args.task, _child)}


def main(argv: list[str] | None = None) -> int:
    """``run``, ``correctness``, ``correctness-large``, ``ddp``, ``profile``, ``figure``, ``list`` (and the internal
    ``child``)."""
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
