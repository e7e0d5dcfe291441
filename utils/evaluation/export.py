"""Export and its checks: merge the adapter into a 16-bit copy of the base model and check the merge by its logits;
check a GGUF export of the merged model (``utils.evaluation.gguf``) by loading it back with transformers."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import PeftModel
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PretrainedConfig, PreTrainedTokenizerFast,
)

from utils.device import DTYPES, dtype_name, gpu_supports_bf16
from utils.evaluation.gguf import (
    GGUF_TYPES, head_dim_of, llama3_rope_factors, read_llama_config, rope_parameters, stop_tokens_of,
)
from utils.evaluation.gguf_read import (
    PRE_TOKENIZER_CHECK_TEXT, PRE_TOKENIZERS, GGUFExportError, llama_cpp_tokenizer, read_gguf_header, rope_freqs_of,
)
from utils.files import save_json
from utils.inference import adapter_state, model_device
from utils.modeling import load_model
from utils.provenance import result_provenance
from utils.quiet import quiet_gguf_loader
from utils.units import GIB

MERGE_CHECK_FILE = "05_merge_check.json"

# Round-trip tolerances per type. max_rel_diff = max |Δlogit| / max |logit| and top1_agreement over every position
# of the prompts and of the merged model's answers (float32 on CPU, both models reading the same ids);
# greedy_agreement = share of greedy answers identical token for token; tokenizer_agreement = share of prompts both
# tokenizers turn into the same ids. f16 keeps 11 significant bits of every weight (a bf16 or fp16 merge loses
# nothing); Q8_0 keeps 8 bits with one f16 scale per block of 32, so near-ties flip: one flip changes the rest of
# that answer, hence the low limit on whole answers next to the per-token top-1 limit. A wrong permutation,
# rope or tokenizer gives agreement near 0, far below every limit.
ROUNDTRIP_TOLERANCES = {
    "f16": {"max_rel_diff": 0.005, "top1_agreement": 0.99, "greedy_agreement": 0.9, "tokenizer_agreement": 1.0},
    "q8_0": {"max_rel_diff": 0.1, "top1_agreement": 0.9, "greedy_agreement": 0.25, "tokenizer_agreement": 1.0},
}


class MergeCheckError(AssertionError):
    """The merged 16-bit model does not reproduce the adapter model's logits within tolerance."""


class GGUFRoundTripError(AssertionError):
    """The GGUF loaded back does not reproduce the merged model within the tolerance of its type."""


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


# --------------------------------------------------------------------------------------------
# GGUF round trip: the file loaded back with transformers against the merged model
# --------------------------------------------------------------------------------------------


def gguf_type_of(gguf_path: Path) -> str:
    """The export type (``f16``, ``q8_0``) a GGUF file declares in ``general.file_type``."""
    file_type = read_gguf_header(gguf_path)[0].get("general.file_type")
    for name, (_, ftype) in GGUF_TYPES.items():
        if ftype == file_type:
            return name
    raise GGUFExportError(f"{gguf_path}: general.file_type={file_type} is not one of {sorted(GGUF_TYPES)}.")


def load_gguf_model(gguf_path: Path, merged_dir: Path, config: PretrainedConfig):
    """The GGUF as a float32 transformers model.

    transformers' GGUF loader reads no rope scaling for Llama and skips ``rope_freqs``; when the file has that
    tensor, it is checked against the merged config's ``llama3`` rope parameters and those are given to the
    loader, so the comparison measures the weights rather than a known gap of the loader. ``config`` is the
    file's own (``AutoConfig`` with ``gguf_file``), read once by the caller: each read parses the whole file.
    """
    factors = rope_freqs_of(gguf_path)
    if factors is not None:
        merged = read_llama_config(merged_dir)
        rope = rope_parameters(merged)
        expected = llama3_rope_factors(rope, head_dim_of(merged)) if rope["rope_type"] == "llama3" else None
        if expected is None or not np.allclose(factors, expected, rtol=1e-6):
            raise GGUFRoundTripError(f"{gguf_path}: its rope_freqs do not match the llama3 rope parameters of "
                                     f"{merged_dir}/config.json; the file was not written from this model.")
        config.rope_parameters = rope
    with quiet_gguf_loader():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config,
                                                     dtype=torch.float32)
    return model.eval()


def prompt_ids(tokenizer, prompt: str | Sequence[dict]) -> list[int]:
    """Token ids of a prompt: a chat (its trailing assistant turn dropped, generation prompt added) or raw text."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    chat = list(prompt)
    while chat and chat[-1].get("role") == "assistant":
        chat = chat[:-1]
    out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def gguf_tokenizer_agreement(gguf_path: Path, prompts: Sequence, ids: Sequence[list[int]]) -> dict[str, Any]:
    """Whether the GGUF's tokenizer gives the merged tokenizer's ``ids`` for every prompt.

    The file's tokenizer is read twice. (1) As llama.cpp reads it (``llama_cpp_tokenizer``: vocabulary, merges,
    token types, the split regexes of ``tokenizer.ggml.pre``, the BOS flag, the chat template), checked against
    llama.cpp's own reference: its ids of llama.cpp's pre-tokenizer check text must hash to the entry of
    llama.cpp's table for that ``tokenizer.ggml.pre``. (2) As transformers' GGUF reader builds it
    (``PreTrainedTokenizerFast.from_pretrained(..., gguf_file=...)``). Up to at least transformers 5.17 that reader
    ignores ``tokenizer.ggml.pre`` for a Llama-3 vocabulary (it splits with GPT-2's regex: "\\n\\n" becomes two
    tokens, "1549" one piece; ``GGUFLlamaConverter`` in ``transformers.integrations.ggml``), adds no BOS and takes BOS
    for EOS, so every chat prompt differs although llama.cpp tokenises the file right; transformers 5.24's reader
    (read from both installed versions) applies the file's split. The reader counts where it reads this file as
    llama.cpp does (the same ids on the check text; the embedded SmolLM2 file, on both versions): then
    ``tokenizer_agreement`` is the share of prompts both readings tokenise as the merged tokenizer; otherwise it is
    llama.cpp's reading alone and ``transformers_gguf_reader`` says why.
    """
    llama_cpp = llama_cpp_tokenizer(gguf_path)
    # PreTrainedTokenizerFast is the class AutoTokenizer builds for a GGUF; called directly it skips a parse of the
    # whole file that AutoTokenizer spends on picking the class (seconds for a large vocabulary).
    hf = PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    pre = read_gguf_header(gguf_path)[0].get("tokenizer.ggml.pre")
    check_ids = llama_cpp.encode(PRE_TOKENIZER_CHECK_TEXT)
    digest = sha256(str(check_ids).encode()).hexdigest()
    faithful = hf.encode(PRE_TOKENIZER_CHECK_TEXT) == check_ids
    same_llama_cpp = [prompt_ids(llama_cpp, p) == x for p, x in zip(prompts, ids)]
    same_hf = [prompt_ids(hf, p) == x for p, x in zip(prompts, ids)]
    counted = [a and (b or not faithful) for a, b in zip(same_llama_cpp, same_hf)]
    return {
        "tokenizer_agreement": float(np.mean(counted)),
        "tokenizer_agreement_llama_cpp": float(np.mean(same_llama_cpp)),
        "tokenizer_agreement_transformers": float(np.mean(same_hf)),
        "llama_cpp_pre_tokenizer_hash_ok": PRE_TOKENIZERS.get(digest) == pre,
        "transformers_gguf_reader": "counted: reads the file as llama.cpp does" if faithful else (
            f"not counted: transformers {transformers.__version__} does not split text as llama.cpp does for "
            f"tokenizer.ggml.pre={pre!r} (up to at least 5.17 it ignores the key; 5.24 reads it)"),
    }


def greedy_answer(model, ids: list[int], max_new_tokens: int, stops: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The greedy answer's tokens (up to and with the first stop token) and the float32 logits at every position
    of prompt + answer (row i predicts token i + 1).

    Greedy decoding with no logits processor, the same for both models whatever their generation_config says:
    one pass over the prompt, then one token at a time from the KV cache.
    """
    cache = DynamicCache()  # filled in place; passed by position, as transformers 5.x renamed the keyword
    with torch.inference_mode():
        rows = [model(torch.tensor([ids]), None, None, cache, use_cache=True).logits[0].float()]
        new = [int(rows[-1][-1].argmax())]
        while new[-1] not in stops and len(new) < max_new_tokens:
            rows.append(model(torch.tensor([new[-1:]]), None, None, cache, use_cache=True).logits[0].float())
            new.append(int(rows[-1][-1].argmax()))
    return torch.cat(rows), new


def forced_logits(model, ids: list[int]) -> torch.Tensor:
    """Float32 logits at every position of ``ids`` (teacher forcing: the model reads them, it does not choose)."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def compare_outputs(ref: list, new: list, tokenizer) -> dict[str, Any]:
    """Logits and greedy answers of two models compared: per prompt, (logits on prompt + the merged model's
    answer, own greedy answer) of each."""
    logits = compare_logits([r[0] for r in ref], [n[0] for n in new])
    logits["max_rel_diff"] = logits["max_abs_diff"] / logits["max_abs_logit"]
    answers = []
    for (_, a), (_, b) in zip(ref, new):
        first = next((k for k, (u, v) in enumerate(zip(a, b)) if u != v), None if len(a) == len(b) else
                     min(len(a), len(b)))
        answers.append({"merged": tokenizer.decode(a, skip_special_tokens=True),
                        "gguf": tokenizer.decode(b, skip_special_tokens=True), "same": a == b,
                        "n_tokens": len(a), "first_difference": first})
    return {**logits, "greedy_agreement": float(np.mean([a["same"] for a in answers])), "answers": answers}


def roundtrip_check(merged_dir: str | os.PathLike, gguf_path: str | os.PathLike, prompts: Sequence,
                    max_new_tokens: int, *, strict: bool = True) -> dict[str, Any]:
    """Load ``gguf_path`` back with transformers and compare it with the merged model on ``prompts``.

    ``prompts`` are chats (lists of ``{"role", "content"}``; a trailing assistant turn is dropped) or raw
    strings. Measured: whether the file's tokenizer gives the merged tokenizer's ids for every prompt
    (``tokenizer_agreement``, with the file read as llama.cpp reads it; see ``gguf_tokenizer_agreement``);
    max and mean |Δlogit| and top-1 agreement over every position of the prompt and of the merged model's greedy
    answer (float32 on CPU, both models reading the same ids); and the share of greedy answers of
    ``max_new_tokens`` that are token-for-token identical (``greedy_agreement``). The verdict uses
    ``ROUNDTRIP_TOLERANCES`` of the file's type; with ``strict`` a failure raises ``GGUFRoundTripError``.
    """
    merged_dir, gguf_path = Path(merged_dir), Path(gguf_path)
    start = time.perf_counter()
    type_name = gguf_type_of(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    gguf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    tokenizers_check = gguf_tokenizer_agreement(gguf_path, prompts, ids)
    stops = tokenizer.convert_tokens_to_ids(stop_tokens_of(merged_dir, tokenizer))
    # one float32 model in memory at a time (a 3B model takes 13 GB)
    model = load_model(str(merged_dir.resolve()), quantization="fp32", device="cpu").eval()
    ref = [greedy_answer(model, x, max_new_tokens, stops) for x in ids]
    del model
    model = load_gguf_model(gguf_path, merged_dir, gguf_config)
    # logits on the merged model's answer (so a difference does not compound), then its own greedy answer
    new = [(forced_logits(model, x + answer[:-1]), greedy_answer(model, x, max_new_tokens, stops)[1])
           for x, (_, answer) in zip(ids, ref)]
    del model
    measured = compare_outputs(ref, new, tokenizer)
    measured.update(tokenizers_check)
    tolerance = ROUNDTRIP_TOLERANCES[type_name]
    failures = [key for key, limit in tolerance.items()
                if (measured[key] > limit if key == "max_rel_diff" else measured[key] < limit)]
    if not measured["llama_cpp_pre_tokenizer_hash_ok"]:
        failures.append("llama_cpp_pre_tokenizer_hash_ok")
    report = {"gguf": str(gguf_path), "merged_dir": str(merged_dir), "type": type_name,
              "bytes": gguf_path.stat().st_size, "n_prompts": len(ids), "max_new_tokens": max_new_tokens,
              **measured, "tolerance": tolerance, "failed": failures, "passed": not failures,
              "seconds": round(time.perf_counter() - start, 2)}
    if strict and failures:
        raise GGUFRoundTripError(
            f"{gguf_path} loaded back differs from {merged_dir} beyond the {type_name} tolerance on "
            + ", ".join(f"{k}={measured[k]:.4g} (limit {tolerance.get(k, True)})" for k in failures)
            + ". Re-export it (export_gguf(..., overwrite=True)) from the merged folder it was written from.")
    return report
