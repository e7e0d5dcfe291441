"""The large-pass check's forward alone: PEFT's and the fast path's loss on the same batches, frozen weights, by dtype.

``python -m utils.speed.benchmark correctness-large`` trains both paths and finds the fast path's loss lower from
step 3 by more than two seeds differ (README, "Training speed on a GPU"). This script asks the question before any
training: with the LoRA update still zero (B = 0), the same weights and the same batches (the check's own plan:
micro-batch 16, the shipped corpus, dropout 0, the fast path with PyTorch's ops, SDPA and its residual stream in
fp32, as the check's ``all`` variant), how far apart are the two forwards, in fp32 and in bf16, and which one is
nearer the fp32 loss? On the CPU the weights are rounded to bf16 once (``load_model(quantization="bf16")``) so
both dtypes see the same numbers; on a GPU they are the NF4 weights the check trains::

    .venv/bin/python tools/large_pass_forward.py                                   # CPU: ~5 minutes, 3 batches
    .venv/bin/python tools/large_pass_forward.py --batches 1 --dtypes fp32 --out /tmp/f.json

Writes ``results/04_large_pass_forward_cpu.json`` (``_gpu`` on a GPU) with the losses, the gaps and provenance.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from utils.device import DTYPES, default_device  # noqa: E402
from utils.files import save_json  # noqa: E402
from utils.modeling import build_lora_config, load_model  # noqa: E402
from utils.paths import RESULTS_DIR, resolve_path  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402
from utils.speed.benchmark import large_pass  # noqa: E402
from utils.speed.benchmark.measure import _fast_loss, _hf_loss  # noqa: E402
from utils.speed.fastpath import enable_fast_path  # noqa: E402

MICRO_BATCH = 16


def _model(impl: str, device: torch.device, dtype: torch.dtype, fast_options):
    """The embedded model with a fresh LoRA (B = 0) as ``impl`` trains it: its loss function."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_model("embedded", quantization="nf4_dq" if cuda else "bf16", device=device,
                          compute_dtype=dtype if cuda else None)
        base.config.use_cache = False
        if impl == "hf":
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        model = get_peft_model(base, build_lora_config(lora_dropout=0.0))
    model.train()
    if impl == "fast":
        enable_fast_path(model, dtype, fast_options)
        return model, _fast_loss(model, fused=False)
    # the benchmark's own PEFT loss; here under autocast on the CPU too (bf16 there is this script's question)
    return model, _hf_loss(model, dtype, device.type if dtype != torch.float32 else None)


def forward_losses(impl: str, dtype: str, batches: int, device: torch.device | None = None) -> list[float]:
    """``impl``'s ("hf" or "fast") loss on each of the check's first ``batches`` optimizer steps, no update."""
    device = device or default_device()
    peft_config, fast_config = large_pass.large_pass_configs(0, MICRO_BATCH, large_pass.LargePassOptions(
        kernels="torch", offload=False, lora_dropout=0.0, fp32_residual=True, attention="sdpa", fused_loss=False))
    config = peft_config if impl == "hf" else fast_config
    model, loss_fn = _model(impl, device, DTYPES[dtype], config.fast)
    plan = large_pass.step_plan(config, large_pass._corpus_for(model.config.vocab_size), batches)
    out = []
    with torch.no_grad():
        for micro in plan:
            num_items = sum(b.label_tokens for b in micro)
            out.append(round(float(sum(loss_fn(b.to(device), num_items) for b in micro)), 6))
    return out


def compare(losses: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per batch: fast − PEFT in each dtype, and each bf16 path's distance from the fp32 PEFT loss."""
    gaps: dict[str, list[float]] = {}
    for dtype in ("fp32", "bf16", "fp16"):
        if f"hf_{dtype}" in losses and f"fast_{dtype}" in losses:
            gaps[f"fast_minus_peft_{dtype}"] = [round(f - h, 6) for h, f in
                                                zip(losses[f"hf_{dtype}"], losses[f"fast_{dtype}"])]
        for impl in ("hf", "fast"):
            if dtype != "fp32" and "hf_fp32" in losses and f"{impl}_{dtype}" in losses:
                gaps[f"{impl}_{dtype}_minus_fp32"] = [round(x - r, 6) for r, x in
                                                      zip(losses["hf_fp32"], losses[f"{impl}_{dtype}"])]
    return gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="optimizer steps of the check's plan (default 3)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16, fp16 "
                        "(default fp32,bf16)")
    parser.add_argument("--out", default=None, help="JSON to write (default results/04_large_pass_forward_"
                        "{cpu,gpu}.json)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or args.batches < 1:
        parser.error(f"--dtypes {args.dtypes} --batches {args.batches}: dtypes from {', '.join(DTYPES)}, "
                     "batches 1 or more.")
    device = default_device()
    out = resolve_path(args.out) if args.out else RESULTS_DIR / (
        f"04_large_pass_forward_{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    losses: dict[str, list[float]] = {}
    for dtype in tqdm(dtypes, desc="dtypes"):
        for impl in ("hf", "fast"):
            losses[f"{impl}_{dtype}"] = forward_losses(impl, dtype, args.batches, device)
    report = {"batches": args.batches, "micro_batch": MICRO_BATCH, "losses": losses, "gaps": compare(losses),
              "method": "The embedded model with a fresh LoRA (B = 0: frozen weights), dropout 0; the large-pass "
                        "check's first batches (micro-batch 16, the shipped corpus); PEFT with "
                        "prepare_model_for_kbit_training under autocast (none in fp32) against the fast path "
                        "(PyTorch's ops, SDPA, fp32 residual stream, PyTorch's cross-entropy); no optimizer step. "
                        "CPU: the weights rounded to bf16 once for every dtype; GPU: NF4 with double quantisation.",
              **result_provenance()}
    save_json(report, out)
    for key, values in report["gaps"].items():
        print(f"{key}: {values}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
