"""Correctness of the large-pass fast path on real weights (issue #20, item 3).

``run_large_pass_correctness`` trains the embedded model (or another) ``steps`` optimizer steps per seed on two
paths, each in a fresh ``python -m utils.speed.benchmark child`` process:

- ``peft_seed<s>``: transformers + PEFT's own forward, as the original recipe sets it up
  (``prepare_model_for_kbit_training``, gradient checkpointing, autocast, per-tensor paged AdamW 8-bit);
- ``fast_seed<s>``: the fast path as the throughput rows run it (flat paged AdamW 8-bit), with its kernels forced
  (``kernels="liger"``: the Triton RoPE and Liger's RMSNorm/SwiGLU on every pass, below the automatic 4096-token
  threshold too) and checkpoints offloaded to pinned host memory.

Both see the same ``micro_batch`` examples of the shipped corpus per optimizer step, in the same order (PEFT as
one right-padded micro-batch, the fast path as one padding-free row), under the same cosine schedule; the seed
sets the LoRA initialisation and dropout (0.05). ``compare_large_pass`` then sets the per-step gap between the
paths at equal seed against the gap between seeds on each path. Each fast row counts the calls of the Triton and
Liger autograd functions (``count_kernel_calls``), so the report shows that the forced kernels ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from utils.config import THESIS
from utils.device import default_device
from utils.files import read_json, save_json
from utils.provenance import result_provenance
from utils.speed.benchmark.configs import BenchConfig, config_by_name
from utils.speed.benchmark.measure import load_model_for, run_child
from utils.speed.benchmark.run import EXPANDABLE
from utils.speed.benchmark.workloads import corpus_examples, corpus_steps, one_row
from utils.speed.results import mean_gap
from utils.train_step import build_optimizer, run_optimizer_steps
from utils.units import GIB

LARGE_PASS_TASK = "large_pass"  # the ``kind`` of a child task that ``large_pass_child`` serves
PEFT_BASE, FAST_BASE = "original_corpus_fp16", "fast_2x1_corpus_fp16"
FLAT_OPTIM = "paged_adamw_8bit_flat"  # the fast rows' optimizer (utils.speed.optim); PEFT's is "paged_adamw_8bit"
# The autograd functions the fast path's "liger" kernel set (and its loss) call, by the module it imports them from
# at call time: replacing the module's attribute counts every call the fast path makes
KERNEL_FUNCTIONS: dict[str, tuple[str, str]] = {
    "rope_triton": ("utils.speed.kernels", "RopeQKV"),
    # the LoRA projections of large passes: Triton dropout, LoRA update inside the q/k/v and gate/up GEMMs
    "lora_fused": ("utils.speed.fastpath.layers", "_FusedLoraLinear"),
    "rms_norm_liger": ("liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
    "swiglu_liger": ("liger_kernel.ops.swiglu", "LigerFusedGateUpSiLUMulFunction"),
    "cross_entropy_liger": ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction"),
}
FORCED = ("rope_triton", "rms_norm_liger", "swiglu_liger")  # what kernels="liger" must have run


def missing_kernel_packages() -> list[str]:
    """The packages that ``kernels="liger"`` needs and this environment lacks."""
    return [name for name, module in (("triton", "triton"), ("liger-kernel", "liger_kernel"))
            if importlib.util.find_spec(module) is None]


def check_large_pass_request(micro_batch: int, seeds: Sequence[int], steps: int, kernels: str,
                             offload: bool = True, attention: str = "auto") -> None:
    """One clear error (the option and the fix) for a request this check cannot answer; nothing otherwise.

    Without a GPU only the check of the logic runs: PyTorch's ops, checkpoints kept, fp32 (``--kernels torch
    --no-offload``)."""
    if micro_batch < 2:
        raise SystemExit(f"--micro-batch {micro_batch}: use 2 or more (16 for issue #20); one example per pass is "
                         "what `correctness` already covers.")
    if len(set(seeds)) < 2:
        raise SystemExit(f"--seeds {','.join(map(str, seeds))}: give two different seeds (e.g. 0,1); the "
                         "seed-to-seed gap is the noise the paths' gap is measured against.")
    if steps < 2:
        raise SystemExit(f"--steps {steps}: use 2 or more (e.g. 30).")
    if not torch.cuda.is_available() and (kernels != "torch" or offload):
        raise SystemExit("correctness-large needs a CUDA GPU (torch.cuda.is_available() is False here): the fast "
                         "path's Triton/Liger kernels and offloaded checkpoints run there. Run it on the GPU "
                         "machine, or pass --kernels torch --no-offload to check the logic on the CPU (fp32).")
    if not torch.cuda.is_available() and attention == "varlen":
        raise SystemExit("--attention varlen needs a CUDA GPU (FlashAttention's varlen kernel); on the CPU use "
                         "--attention auto or sdpa.")
    missing = missing_kernel_packages() if kernels == "liger" else []
    if missing:
        raise SystemExit(f"--kernels liger needs {' and '.join(missing)} (pip install liger-kernel, which brings "
                         "triton); install it, or pass --kernels torch to check PyTorch's ops.")


@dataclass(frozen=True)
class LargePassOptions:
    """What one large-pass check varies; the defaults are issue #20's check (bf16, the Liger/Triton kernels forced,
    checkpoints offloaded, the thesis's dropout, PEFT with its fp32 upcast, the fast path as the throughput rows).

    ``peft_prepare=False``: PEFT without ``prepare_model_for_kbit_training``, whose fp32 upcast of the embeddings
    and norms keeps the residual stream in fp32; the fast path keeps it in the compute dtype, as PEFT does without
    the upcast, so that comparison isolates the fast path's own numerics from the upcast's. ``fp32_residual=True``
    does the converse: the fast path keeps its residual stream in fp32, as PEFT after the upcast. The other three
    make one more part of the fast path as PEFT's: ``attention="sdpa"`` (one padded row per sequence instead of
    FlashAttention's varlen kernel), ``fused_loss=False`` (PyTorch's cross-entropy instead of Liger's fused one),
    ``fast_optim="paged_adamw_8bit"`` (bitsandbytes' per-tensor update instead of the flat buffer).
    ``dtype="fp32"``: both paths without autocast, the reference the rounded runs are measured against.
    """

    dtype: str = "bf16"
    kernels: str = "liger"
    offload: bool = True
    lora_dropout: float = THESIS.lora_dropout
    peft_prepare: bool = True
    fp32_residual: bool = False
    attention: str = "auto"
    fused_loss: bool = True
    fast_optim: str = FLAT_OPTIM


def large_pass_configs(seed: int, micro_batch: int = 16,
                       options: LargePassOptions = LargePassOptions()) -> tuple[BenchConfig, BenchConfig]:
    """The PEFT and fast-path configurations of one seed: the corpus rows of ``correctness`` at ``micro_batch``."""
    o = options
    peft_base, fast_base = config_by_name(PEFT_BASE), config_by_name(FAST_BASE)
    common = dict(dtype=o.dtype, micro_batch=micro_batch, accumulation=1, lora_dropout=o.lora_dropout,
                  group="large_pass")
    peft = replace(peft_base, name=f"peft_seed{seed}", prediction="the reference", prepare=o.peft_prepare, **common)
    fast = replace(fast_base, name=f"fast_seed{seed}", **common, fused_loss=o.fused_loss, optim=o.fast_optim,
                   fast=replace(fast_base.fast, kernels=o.kernels, offload_checkpoints=o.offload,
                                fp32_residual=o.fp32_residual, attention=o.attention),
                   prediction="per-step loss within the seed-to-seed gap of the PEFT path")
    return peft, fast


def step_plan(config: BenchConfig, examples: Sequence[dict], steps: int) -> list:
    """``micro_batch`` examples per optimizer step, in corpus order (cycling): the same examples on both paths.

    PEFT takes them as one right-padded micro-batch (``workloads.corpus_steps``); the fast path as one padding-free
    row with positions restarting per example (``workloads.one_row``), however many tokens they hold.
    """
    if config.impl == "fast":
        n = len(examples)
        return [[one_row([examples[(s * config.micro_batch + i) % n] for i in range(config.micro_batch)])]
                for s in range(steps)]
    return corpus_steps(replace(config, accumulation=1), list(examples), steps)


class _Counted:
    """Stands in for an autograd function class: counts its ``apply`` calls, then runs the original."""

    def __init__(self, original: Any, calls: Counter, key: str):
        self.original, self.calls, self.key = original, calls, key

    def apply(self, *args: Any) -> Any:
        """Count the call, then run the original function's ``apply``."""
        self.calls[self.key] += 1
        return self.original.apply(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


@contextmanager
def count_kernel_calls(targets: Mapping[str, tuple[str, str]] = KERNEL_FUNCTIONS) -> Iterator[dict]:
    """Count the ``apply`` calls of each target's autograd function while the block runs.

    Yields {name: calls}, or None for a target whose module cannot be imported here (no Triton, no Liger).
    """
    calls: Counter = Counter()
    patched, found = [], {}
    for key, (module_name, attribute) in targets.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # optional packages: a CPU install has neither Triton nor Liger
            found[key] = None
            continue
        original = getattr(module, attribute)
        setattr(module, attribute, _Counted(original, calls, key))
        patched.append((module, attribute, original))
        found[key] = 0
    counts: dict[str, int | None] = dict(found)
    try:
        yield counts
    finally:
        for module, attribute, original in patched:
            setattr(module, attribute, original)
        counts.update({key: calls[key] for key, value in found.items() if value is not None})


def _corpus_for(vocab: int) -> list[dict]:
    """The shipped training examples tokenized for the model's vocabulary, as ``measure`` orders them (seed 0)."""
    return corpus_examples("llama-3.2" if vocab >= 128000 else "embedded", seed=0,
                           vocab=vocab if vocab < 49152 else None)


def train_large_pass(config: BenchConfig, model: str, steps: int, seed: int) -> dict[str, Any]:
    """Train ``config`` ``steps`` optimizer steps (cosine schedule, 10 % warm-up) on the large-pass plan; its row."""
    device = str(default_device())
    torch.manual_seed(seed)  # before loading, as ``measure``: the LoRA initialisation, then the dropout masks
    started = time.perf_counter()
    peft_model, loss_fn, details = load_model_for(config, model, device)
    load_seconds = time.perf_counter() - started
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if (cuda and config.dtype == "fp16") else None
    plan = step_plan(config, _corpus_for(peft_model.config.vocab_size), steps)
    peft_model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log = run_optimizer_steps(plan, loss_fn, params, optimizer, device, scaler=scaler, scheduler=scheduler)
    if config.impl == "fast":
        details["fast_path"] = peft_model.get_base_model().model._fast_path.describe()
    return {
        **asdict(config), "ok": True, "seed": seed, "device": device, "details": details,
        "load_seconds": round(load_seconds, 1), "steps": steps,
        "seconds_per_step": round(log.seconds_per_step, 5), "losses": log.losses,
        "tokens_per_step": log.tokens, "label_tokens_per_step": log.label_tokens,
        "examples_per_step": config.micro_batch,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
    }


def forced_kernels_ran(row: dict) -> bool | None:
    """Whether a fast row forced to "liger" ran the Triton RoPE, Liger RMSNorm and SwiGLU on every pass (its
    resolved kernel set has no smaller-pass fallback and each function was called); None for other rows."""
    if row.get("impl") != "fast" or (row.get("fast") or {}).get("kernels") != "liger":
        return None
    calls = row.get("kernel_calls") or {}
    described = ((row.get("details") or {}).get("fast_path") or {}).get("kernels")
    return described == "liger" and all((calls.get(k) or 0) > 0 for k in FORCED)


def large_pass_child(task: dict) -> dict:
    """The child side of one run: train it while counting the Triton/Liger calls; a failure is its row."""
    config = BenchConfig.from_dict(task["config"])
    try:
        with count_kernel_calls() as calls:
            row = train_large_pass(config, task["model"], task["steps"], task["seed"])
    except torch.cuda.OutOfMemoryError as exc:
        return {**asdict(config), "ok": False, "seed": task["seed"],
                "error": f"out of memory: {str(exc).splitlines()[0]}"}
    row["kernel_calls"] = calls
    row["forced_kernels_ran"] = forced_kernels_ran(row)
    return row


def _verdict(out: dict[str, Any], seeds: list[str]) -> bool | None:
    """True when every seed's fast-vs-PEFT gap is under both paths' seed-to-seed gaps; None if a run is missing."""
    gaps = [out.get(f"fast_vs_peft_seed{s}") for s in seeds]
    noise = [out.get("peft_seed_vs_seed"), out.get("fast_seed_vs_seed")]
    if len(seeds) < 2 or None in gaps or None in noise:
        return None
    return max(gaps) < min(noise)


def compare_large_pass(runs: Sequence[dict]) -> dict[str, Any]:
    """Per-step |fast − PEFT| at equal seed against |seed a − seed b| on each path; ``agree_within_seed_noise``.

    Gaps are means over the steps. Step 1 runs identical weights on both paths (LoRA B starts at zero), so its
    gap (``first_step_fast_vs_peft_seed<s>``) is the kernels' numerics alone. ``same_batches``: every run counted
    the same label tokens at every step. ``forced_kernels_ran``: every fast row forced to "liger" ran them.
    """
    ok = {r["name"]: r for r in runs if r.get("ok")}
    seeds = sorted({name.split("seed")[1] for name in ok}, key=int)
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds]}
    for s in seeds:
        peft, fast = ok.get(f"peft_seed{s}"), ok.get(f"fast_seed{s}")
        if peft and fast:
            out[f"fast_vs_peft_seed{s}"] = mean_gap(peft["losses"], fast["losses"], 5)
            out[f"first_step_fast_vs_peft_seed{s}"] = round(abs(peft["losses"][0] - fast["losses"][0]), 5)
            out[f"per_step_fast_vs_peft_seed{s}"] = [round(abs(x - y), 5)
                                                     for x, y in zip(peft["losses"], fast["losses"])]
    for path in ("peft", "fast"):
        pair = [ok.get(f"{path}_seed{s}") for s in seeds[:2]]
        if len(pair) == 2 and all(pair):
            out[f"{path}_seed_vs_seed"] = mean_gap(pair[0]["losses"], pair[1]["losses"], 5)
    out["agree_within_seed_noise"] = _verdict(out, seeds)
    out["same_batches"] = len({json.dumps(r["label_tokens_per_step"]) for r in ok.values()}) == 1 if ok else None
    flags = [forced_kernels_ran(r) for r in ok.values() if r.get("impl") == "fast"]
    flags = [f for f in flags if f is not None]
    out["forced_kernels_ran"] = all(flags) if flags else None
    out["missing"] = sorted({f"{p}_seed{s}" for p in ("peft", "fast") for s in seeds} - set(ok))
    return out


def compare_with_reference(rounded: dict, reference: dict) -> dict[str, Any]:
    """Each path of a bf16/fp16 report against the fp32 PEFT run of the same seed (``--dtype fp32``): how far each
    path's per-step loss sits from the arithmetic it rounds, as mean |Δ| and mean signed Δ (positive: above it).

    Both reports must have trained the same plan (steps, micro-batch, dropout, label tokens per step); one clear
    error (``ValueError``) names the setting that differs. ``fast_nearer``: for every seed the fast path's mean
    |Δ| is at most PEFT's.
    """
    if reference.get("dtype") != "fp32":
        raise ValueError(f"the reference ran in {reference.get('dtype')!r}: give a `correctness-large --dtype fp32` "
                         "report as the reference.")
    for key in ("steps", "micro_batch", "lora_dropout", "model"):
        if rounded.get(key) != reference.get(key):
            raise ValueError(f"{key}: {rounded.get(key)!r} here, {reference.get(key)!r} in the reference; rerun "
                             f"one of them with the other's --{key.replace('_', '-')}.")
    ref = {r["name"]: r for r in reference["runs"] if r.get("ok")}
    out: dict[str, Any] = {"dtype": rounded.get("dtype"), "rows": {}}
    nearer = []
    for row in (r for r in rounded["runs"] if r.get("ok")):
        base = ref.get(f"peft_seed{row['seed']}")
        if base is None:
            continue
        if base["label_tokens_per_step"] != row["label_tokens_per_step"]:
            raise ValueError(f"{row['name']}: its batches differ from the reference's (label tokens per step); "
                             "both must come from the same corpus and plan.")
        signed = statistics.mean(x - y for x, y in zip(row["losses"], base["losses"]))
        out["rows"][row["name"]] = {"mean_abs": mean_gap(row["losses"], base["losses"], 5),
                                    "mean_signed": round(signed, 5)}
    for seed in sorted({r["seed"] for r in rounded["runs"] if r.get("ok")}):
        peft, fast = out["rows"].get(f"peft_seed{seed}"), out["rows"].get(f"fast_seed{seed}")
        if peft and fast:
            nearer.append(fast["mean_abs"] <= peft["mean_abs"])
    out["fast_nearer"] = all(nearer) if nearer else None
    return out


def run_reference_comparison(reference_path: Path, rounded_paths: Sequence[Path], out: Path) -> dict:
    """``compare_with_reference`` for each rounded report; written to ``out`` with provenance; the report."""
    reference = read_json(reference_path)
    report: dict[str, Any] = {
        "reference": str(reference_path.name), "reference_commit": reference.get("commit"),
        "reference_comparison": reference.get("comparison"), **result_provenance(),
        "method": "Per-step loss of each path of each bf16 report minus the fp32 PEFT run's at the same seed "
                  "(same batches, same schedule): mean |Δ| and mean signed Δ over the steps.",
        "reports": {},
    }
    for path in rounded_paths:
        rounded = read_json(path)
        try:
            report["reports"][path.name] = {"source_commit": rounded.get("commit"),
                                            **compare_with_reference(rounded, reference)}
        except ValueError as exc:
            raise SystemExit(f"{path}: {exc}") from None
    save_json(report, out)
    return report


def _method(steps: int, micro_batch: int, options: LargePassOptions = LargePassOptions()) -> str:
    """How the runs were made, in one paragraph (the report's ``method``)."""
    o = options
    prepare = ("prepare_model_for_kbit_training (fp32 embeddings and norms)" if o.peft_prepare else
               "without prepare_model_for_kbit_training (residual stream in the compute dtype, as the fast path)")
    autocast = "no autocast (fp32)" if o.dtype == "fp32" else "autocast"
    return (f"Both paths see the same {micro_batch} examples of the shipped corpus per optimizer step, in the same "
            f"order, for {steps} steps: PEFT (transformers' forward, {prepare}, gradient "
            f"checkpointing, {autocast}, per-tensor paged AdamW 8-bit) as one right-padded micro-batch, the fast "
            f"path (kernels={o.kernels!r}, checkpoints "
            f"{'offloaded to pinned host memory' if o.offload else 'on the GPU'}, "
            f"residual stream in {'fp32' if o.fp32_residual else 'the compute dtype'}, attention={o.attention!r}, "
            f"{'Liger' if o.fused_loss else 'PyTorch'} cross-entropy, "
            f"{'flat' if o.fast_optim == FLAT_OPTIM else 'per-tensor'} paged AdamW 8-bit) as one padding-free row. "
            "Same cosine schedule (10 % warm-up, lr "
            f"{THESIS.learning_rate}), LoRA r={THESIS.lora_r}, alpha={THESIS.lora_alpha}, dropout "
            f"{o.lora_dropout}, clip {THESIS.max_grad_norm}; the seed sets LoRA init and dropout. Loss = mean "
            "over the step's completion tokens. Gaps = mean over steps of |loss difference|; the paths agree when "
            "every seed's fast-vs-PEFT gap is under both paths' seed-to-seed gaps. Fast rows count the calls of the "
            "Triton RoPE, fused LoRA projection and Liger RMSNorm/SwiGLU/cross-entropy autograd functions "
            "(kernel_calls).")


def _print_run(row: dict) -> None:
    """One line per run: first and last loss, s/step and the forced kernels' calls (or the error)."""
    name = row.get("name")
    if not row.get("ok"):
        print(f"[correctness-large] {name}: {row.get('error')}", flush=True)
        return
    calls = {k: v for k, v in (row.get("kernel_calls") or {}).items() if v}
    print(f"[correctness-large] {name}: loss {row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}, "
          f"{row['seconds_per_step']:.3f} s/step, kernel calls {calls or 'none'}"
          + (f", forced kernels ran: {row['forced_kernels_ran']}" if row.get("forced_kernels_ran") is not None
             else ""), flush=True)


def run_large_pass_correctness(out: Path, model: str = "embedded", steps: int = 30, micro_batch: int = 16,
                               seeds: Sequence[int] = (0, 1), options: LargePassOptions = LargePassOptions(),
                               timeout: float = 900) -> dict:
    """Train both paths per seed, each in its own process; write the JSON after every run; the report."""
    check_large_pass_request(micro_batch, seeds, steps, options.kernels, options.offload, options.attention)
    ran_in = options.dtype if torch.cuda.is_available() else "fp32"  # the CPU check runs in fp32 (``measure``)
    settings = asdict(options)
    settings["offload_checkpoints"] = settings.pop("offload")
    report: dict[str, Any] = {
        "model": model, "steps": steps, "micro_batch": micro_batch, **settings, "dtype": ran_in,
        **result_provenance(),
        "method": _method(steps, micro_batch, options),
        "runs": [],
    }
    for seed in seeds:
        for config in large_pass_configs(seed, micro_batch, options):
            task = {"kind": LARGE_PASS_TASK, "config": asdict(config), "model": model, "steps": steps, "seed": seed}
            row = run_child(task, timeout, EXPANDABLE if config.expandable_segments else {})
            _print_run(row)
            report["runs"].append(row)
            report["comparison"] = compare_large_pass(report["runs"])
            save_json(report, out)
    print("[correctness-large] " + json.dumps({k: v for k, v in report["comparison"].items()
                                                if not k.startswith("per_step")}), flush=True)
    return report
