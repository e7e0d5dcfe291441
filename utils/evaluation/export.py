"""Export: merge the adapter into a 16-bit copy of the base model, and check the merge by its logits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from utils.device import DTYPES, dtype_name, gpu_supports_bf16
from utils.files import save_json
from utils.inference import adapter_state, model_device
from utils.modeling import load_model
from utils.provenance import result_provenance
from utils.units import GIB

MERGE_CHECK_FILE = "05_merge_check.json"


class MergeCheckError(AssertionError):
    """The merged 16-bit model does not reproduce the adapter model's logits within tolerance."""


def merge_dtype(name: str = "auto") -> torch.dtype:
    """16-bit dtype of the merged copy: "fp16", "bf16", or "auto" (fp16 when this machine's GPU has no
    bf16, as the RTX 2070 SUPER, so the exported model runs there; bf16 otherwise)."""
    if name in ("fp16", "bf16"):
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"merge_dtype={name!r}: use 'auto', 'fp16' or 'bf16'.")
    return torch.float16 if torch.cuda.is_available() and not gpu_supports_bf16() else torch.bfloat16


def probe_logits(model, tokenizer, chats: Sequence[Sequence[dict]], adapter: bool = True) -> list[torch.Tensor]:
    """Float32 CPU logits of each full chat (the probe the merge check compares)."""
    device = model_device(model)
    out = []
    model.eval()
    with adapter_state(model, adapter), torch.inference_mode():
        for chat in chats:
            enc = tokenizer.apply_chat_template(list(chat), return_tensors="pt", return_dict=True).to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare_logits(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> dict[str, float]:
    """Largest absolute logit difference and share of positions with the same top-1 token."""
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b)]
    means = [float((x - y).abs().mean()) for x, y in zip(a, b)]
    same = [float((x.argmax(-1) == y.argmax(-1)).float().mean()) for x, y in zip(a, b)]
    scale = max(float(x.abs().max()) for x in a)
    return {"max_abs_diff": max(diffs), "mean_abs_diff": float(np.mean(means)), "max_abs_logit": scale,
            "top1_agreement": float(np.mean(same))}


def _merge_and_save(adapter_dir: Path, model_name: str, out_dir: Path, probe_chats: Sequence[Sequence[dict]],
                    dtype: torch.dtype, device: str | torch.device):
    """Merge the adapter into the unquantised ``dtype`` base and save it with the tokenizer in ``out_dir``.

    Returns (tokenizer, logits of the unmerged adapter model on ``probe_chats``).
    """
    base = load_model(model_name, quantization=dtype_name(dtype), device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    unmerged = probe_logits(peft_model, tokenizer, probe_chats)
    merged = peft_model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer, unmerged


def _merge_report(out_dir: Path, dtype: torch.dtype, device: str | torch.device, rtol: float,
                  n_probe: int, check: dict[str, float]) -> dict[str, Any]:
    """The merge check's verdict: tolerance in units of ``dtype`` rounding, and whether it passed."""
    eps = torch.finfo(dtype).eps
    tolerance = rtol * eps * check["max_abs_logit"]
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return {
        "folder": str(out_dir), "dtype": dtype_name(dtype), "device": str(device),
        "safetensors_gib": size / GIB, "rtol": rtol, "tolerance_mean_abs_diff": tolerance,
        "rounding_units": check["mean_abs_diff"] / (eps * check["max_abs_logit"]),
        "probe_chats": n_probe, "merged_vs_adapter": check,
        "passed": check["mean_abs_diff"] <= tolerance,
    }


def export_merged(
    adapter_dir: Path,
    model_name: str,
    out_dir: Path,
    probe_chats: Sequence[Sequence[dict]],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    rtol: float = 4.0,
    reference_logits: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Merge the adapter into an unquantised 16-bit base, save it with the tokenizer, check its logits.

    The base is reloaded unquantised because merging into 4-bit weights re-quantises the sum and
    shifts the outputs. The check compares, on ``probe_chats``, the adapter applied on the same 16-bit
    base (unmerged) with the merged copy **reloaded from disk**. Both carry 16-bit rounding, so the
    tolerance is in units of it: the check passes when the mean absolute logit difference is at most
    ``rtol × eps(dtype) × max |logit|`` (bf16 eps = 2⁻⁸, fp16 eps = 2⁻¹¹; a correct merge measures about
    1 unit), else it raises ``MergeCheckError``. ``reference_logits`` (the evaluated, possibly 4-bit,
    model) are compared too, for information: that gap is the quantisation error, not the merge's.
    The report is also written to ``out_dir/05_merge_check.json`` with its provenance.
    """
    out_dir = Path(out_dir)
    tokenizer, unmerged = _merge_and_save(adapter_dir, model_name, out_dir, probe_chats, dtype, device)
    reloaded = load_model(str(out_dir), quantization=dtype_name(dtype), device=device)
    merged = probe_logits(reloaded, tokenizer, probe_chats, adapter=True)
    del reloaded
    check = compare_logits(unmerged, merged)
    report = _merge_report(out_dir, dtype, device, rtol, len(probe_chats), check)
    if reference_logits is not None:
        report["merged_vs_evaluated_model"] = compare_logits(list(reference_logits), merged)
    save_json({**report, **result_provenance()}, out_dir / MERGE_CHECK_FILE)
    if not report["passed"]:
        raise MergeCheckError(
            f"the merged model in {out_dir} differs from the adapter model by {check['mean_abs_diff']:.3g} "
            f"on average in the logits ({report['rounding_units']:.1f} units of {report['dtype']} rounding; "
            f"tolerance merge_rtol={rtol}). Check that model_name={model_name!r} is the base the adapter "
            "was trained on (04_config.json) and that the adapter folder is complete."
        )
    return report
