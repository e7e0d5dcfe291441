"""How long 2000 steps would take on the student's card: an estimate, not a measurement.

The seed claims "2–3 horas en una RTX 2070 SUPER" for the thesis run. Nobody here has that card, so notebook 04
estimates it from four inputs, each stated:

1. **Work per step** (FLOPs): tokens per optimiser step of the shipped corpus under the thesis recipe (batch
   1 × accumulation 2, measured with the Llama-3.2 tokenizer) × FLOPs per token of Llama-3.2-3B. Per token:
   forward 2N, backward 2N for the input gradients only (the base is frozen: no weight gradients), the
   recomputation under gradient checkpointing (the original recomputes each layer's whole forward, 2N of the
   layers; the fast path keeps the layer input, the residual after attention and the q/k/v projection, so it
   recomputes only gate/up), plus LoRA (forward, both gradients, recomputation) and attention (causal, at the
   corpus's mean length). N counts the matrix multiplications: the 7 projections of 28 layers and the output
   head (tied to the embedding, a 3072 × 128256 product).
2. **NF4 dequantisation** (an assumption): every pass over a 4-bit weight dequantises it to fp16 first,
   bandwidth-bound, not overlapped with the products: 0.5 B read + 2 B written + 2 B read by the product =
   4.5 B per parameter per pass. The original makes 3 passes per micro-batch (forward, recomputation, backward)
   over 2 micro-batches; the fast path one forward, one backward and the gate/up recomputation over one.
3. **The card's published peak**: Turing's tensor cores do 1024 FP16 FLOP per clock per SM (NVIDIA Turing
   whitepaper); a GeForce card runs them at half rate with fp32 accumulation, which is what PyTorch's fp16
   products use. RTX 2070 SUPER: 40 SMs at 1770 MHz boost, 448 GB/s (NVIDIA's product page) → 72.5 TFLOPS
   with fp16 accumulation, **36.2 TFLOPS** with fp32 accumulation.
4. **Utilisation and the host**: the fraction of that peak the products reach is taken between an assumed
   25 % (products of one or two short sequences) and the 46 % the fast path reached on the H200 at micro-batch
   32 (``results/04_speed_corpus_h200.json``, its dequantisation time taken out). A step also cannot be shorter
   than the CPU's time to launch it: the H200 measurements of the small recipes are host-bound (the GPU idles
   most of the step), so their seconds per step are taken as the host's floor, assuming a desktop CPU launches
   as fast as that server's.

Seconds per step = max(host floor, work / (peak × utilisation) + dequantisation bytes / bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Any, Iterable, Sequence

from utils.config import THESIS
from utils.data import sequence_lengths

# Turing: 8 tensor cores per SM x 64 FP16 FMA per clock x 2 FLOP (NVIDIA Turing whitepaper, "Turing Tensor Cores").
TURING_FP16_FLOP_PER_CLOCK_PER_SM = 1024
NF4_DEQUANT_BYTES_PER_PARAMETER = 0.5 + 2.0 + 2.0  # read NF4, write fp16, read fp16 in the product
ASSUMED_LOW_UTILISATION = 0.25
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TURING_SOURCE = ("NVIDIA, Turing GPU Architecture whitepaper (2018): 8 tensor cores per SM, 64 FP16 FMA per clock "
                 "each; GeForce RTX 2080 Ti: 107,6 TFLOPS FP16 with FP16 accumulation, 53,8 with FP32 accumulation "
                 "(half rate on GeForce)")


@dataclass(frozen=True)
class GpuPeak:
    """A card's published dense fp16 tensor throughput (fp32 accumulation) and memory bandwidth."""

    name: str
    tensor_tflops: float
    memory_gb_s: float
    source: str


def turing_tensor_tflops(sms: int, boost_mhz: float, fp32_accumulate: bool = True) -> float:
    """Peak dense FP16 tensor TFLOPS of a GeForce Turing card (half rate with fp32 accumulation)."""
    flops = sms * TURING_FP16_FLOP_PER_CLOCK_PER_SM * boost_mhz * 1e6
    return flops / (2 if fp32_accumulate else 1) / 1e12


RTX_2070_SUPER = GpuPeak(
    "NVIDIA GeForce RTX 2070 SUPER", turing_tensor_tflops(40, 1770), 448.0,
    TURING_SOURCE + "; NVIDIA GeForce RTX 2070 SUPER specifications (2019): 2560 CUDA cores = 40 SM, 1770 MHz "
                    "boost, 8 GB GDDR6 at 14 Gbps on 256 bits = 448 GB/s")
H200 = GpuPeak("NVIDIA H200", 989.4, 4800.0,
               "NVIDIA H200 Tensor Core GPU datasheet (2024): FP16 Tensor Core 1979 TFLOPS with sparsity, i.e. "
               "989 dense; 4,8 TB/s")


@dataclass(frozen=True)
class StepRecipe:
    """How a configuration runs one optimiser step: passes per step and what the recomputation repeats."""

    name: str
    micro_batches: int  # forward/backward passes per optimiser step
    recompute: tuple[str, ...]  # projections recomputed under gradient checkpointing


ORIGINAL = StepRecipe("original", THESIS.gradient_accumulation_steps, PROJECTIONS)
# The fast path runs the 1 x 2 sequences as one padding-free pass and recomputes gate/up only.
FAST_PATH = StepRecipe("fast_path", 1, ("gate_proj", "up_proj"))


def projection_parameters(config) -> dict[str, int]:
    """Parameters of each of the seven projections of one decoder layer (Llama: GQA, gated MLP)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    return {name: a * b for name, (a, b) in shapes.items()}


def lora_parameters(config, r: int = THESIS.lora_r) -> int:
    """LoRA parameters of the seven projections of every layer: r × (in + out) each."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    sides = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]
    return config.num_hidden_layers * sum(r * (a + b) for a, b in sides)


def flops_per_token(config, recipe: StepRecipe, context_tokens: float, r: int = THESIS.lora_r) -> dict[str, float]:
    """FLOPs per trained token by part: forward, backward (input gradients), recomputation, LoRA, attention.

    ``context_tokens``: mean tokens a token attends to (half the mean sequence length, causal).
    """
    layers = config.num_hidden_layers
    per_layer = projection_parameters(config)
    layer_params = layers * sum(per_layer.values())
    head = config.hidden_size * config.vocab_size
    recomputed = layers * sum(per_layer[name] for name in recipe.recompute)
    full_recompute = set(recipe.recompute) == set(PROJECTIONS)
    lora = lora_parameters(config, r)
    attention_dim = config.num_attention_heads * (getattr(config, "head_dim", None)
                                                   or config.hidden_size // config.num_attention_heads)
    attention_forward = 2 * 2 * layers * context_tokens * attention_dim  # QKᵀ and AV
    parts = {
        "forward": 2.0 * (layer_params + head),
        "backward": 2.0 * (layer_params + head),  # input gradients; frozen weights get none
        "recompute": 2.0 * recomputed,
        # LoRA: forward, input gradient, weight gradients, recomputation (when the whole layer is recomputed)
        "lora": 2.0 * lora * (3 + (1 if full_recompute else 0)),
        # attention scores and values: forward, twice that backward, once more when recomputed
        "attention": attention_forward * (3 + (1 if full_recompute else 0)),
    }
    parts["total"] = sum(parts.values())
    return parts


def dequant_bytes_per_step(config, recipe: StepRecipe) -> float:
    """Bytes moved to dequantise the 4-bit decoder weights in one optimiser step (the assumption above).

    Per micro-batch: the forward and the backward read every weight, the recomputation the ones it repeats.
    """
    per_layer = projection_parameters(config)
    layer_params = config.num_hidden_layers * sum(per_layer.values())
    recomputed = config.num_hidden_layers * sum(per_layer[name] for name in recipe.recompute)
    return recipe.micro_batches * (2 * layer_params + recomputed) * NF4_DEQUANT_BYTES_PER_PARAMETER


def gpu_seconds(work_flops: float, dequant_bytes: float, peak: GpuPeak, utilisation: float) -> float:
    """Seconds of GPU work: the products at ``utilisation`` of the peak, then the dequantisation traffic."""
    return work_flops / (peak.tensor_tflops * 1e12 * utilisation) + dequant_bytes / (peak.memory_gb_s * 1e9)


def step_seconds(gpu_s: float, host_s: float) -> float:
    """A step takes the longer of the GPU's work and the CPU's time to launch it."""
    return max(gpu_s, host_s)


def hours_for(steps: int, seconds_per_step: float) -> float:
    """Hours for ``steps`` optimiser steps."""
    return steps * seconds_per_step / 3600


def corpus_lengths(records: Sequence[dict], tokenizer, max_seq_length: int = THESIS.max_seq_length) -> list[int]:
    """Tokens of each example as training sees it (chat template, cut at ``max_seq_length``)."""
    return [min(total, max_seq_length) for _, total in sequence_lengths(records, tokenizer)]


def measured_utilisation(row: dict[str, Any], config, recipe: StepRecipe, peak: GpuPeak) -> float:
    """Fraction of ``peak`` the products reached in a benchmark row (its dequantisation time taken out).

    ``row``: one row of ``utils.speed.benchmark``'s report (``tokens_per_step``, ``seconds_per_step``,
    ``micro_batch``); the context is taken as half the row's mean sequence length.
    """
    mean_length = row["tokens_per_step"] / row["micro_batch"]
    work = row["tokens_per_step"] * flops_per_token(config, recipe, mean_length / 2)["total"]
    dequant = dequant_bytes_per_step(config, recipe) / (peak.memory_gb_s * 1e9)
    return work / ((row["seconds_per_step"] - dequant) * peak.tensor_tflops * 1e12)


def host_seconds(reports: Iterable[dict[str, Any]], names: Sequence[str]) -> tuple[float, float]:
    """(fastest, slowest) seconds per step of the rows called ``names`` across benchmark reports."""
    seconds = [row["seconds_per_step"] for report in reports for row in report.get("rows", [])
               if row.get("name") in names and row.get("ok", True)]
    if not seconds:
        raise ValueError(f"no benchmark row named {', '.join(names)} in the reports")
    return min(seconds), max(seconds)


@dataclass(frozen=True)
class EstimateInputs:
    """Everything one estimate row needs besides the model's config."""

    workload: str  # "corpus" (the shipped examples) or "max_length" (every example at max_seq_length)
    tokens_per_step: float
    mean_length: float
    host_s: tuple[float, float]
    utilisation: tuple[float, float]


def estimate_row(config, recipe: StepRecipe, inputs: EstimateInputs, peak: GpuPeak = RTX_2070_SUPER,
                 steps: int = THESIS.max_steps) -> dict[str, Any]:
    """One configuration's estimate: work per step, GPU and host seconds, hours for ``steps`` (low, high)."""
    flops = flops_per_token(config, recipe, inputs.mean_length / 2)
    work = inputs.tokens_per_step * flops["total"]
    dequant = dequant_bytes_per_step(config, recipe)
    high_u, low_u = max(inputs.utilisation), min(inputs.utilisation)
    gpu = (gpu_seconds(work, dequant, peak, high_u), gpu_seconds(work, dequant, peak, low_u))
    step = (step_seconds(gpu[0], min(inputs.host_s)), step_seconds(gpu[1], max(inputs.host_s)))
    return {
        "recipe": recipe.name, "workload": inputs.workload, "card": peak.name, "steps": steps,
        "tokens_per_step": inputs.tokens_per_step, "gflop_per_token": flops["total"] / 1e9,
        "tflop_per_step": work / 1e12, "dequant_gb_per_step": dequant / 1e9,
        "utilisation_low": low_u, "utilisation_high": high_u,
        "gpu_s_low": gpu[0], "gpu_s_high": gpu[1], "host_s_low": min(inputs.host_s), "host_s_high": max(inputs.host_s),
        "step_s_low": step[0], "step_s_high": step[1],
        "hours_low": hours_for(steps, step[0]), "hours_high": hours_for(steps, step[1]),
    }


def estimate_hours(config, lengths: Sequence[int], speed_reports: Sequence[dict[str, Any]],
                   max_seq_length: int = THESIS.max_seq_length, peak: GpuPeak = RTX_2070_SUPER,
                   steps: int = THESIS.max_steps) -> list[dict[str, Any]]:
    """The estimate for the original configuration and the fast path, on the corpus and at ``max_seq_length``.

    ``lengths``: tokens per example of the training corpus (``corpus_lengths``). ``speed_reports``: the H200
    benchmark reports (``04_speed_benchmark.json``, ``04_speed_corpus_h200.json``) for the host floors and the
    measured utilisation.
    """
    sequences = THESIS.per_device_train_batch_size * THESIS.gradient_accumulation_steps
    rows = [r for report in speed_reports for r in report.get("rows", [])]
    best = next(r for r in rows if r.get("name") == "fast_mb32_corpus_bf16")
    high = measured_utilisation(best, config, FAST_PATH, H200)
    utilisation = (ASSUMED_LOW_UTILISATION, high)
    hosts = {ORIGINAL.name: host_seconds(speed_reports, ("original_fp16", "original_corpus_fp16")),
             FAST_PATH.name: host_seconds(speed_reports, ("fast_2x1_fp16", "fast_2x1_corpus_fp16"))}
    workloads = [("corpus", sequences * fmean(lengths), fmean(lengths)),
                 ("max_length", sequences * max_seq_length, max_seq_length)]
    return [estimate_row(config, recipe, EstimateInputs(name, tokens, length, hosts[recipe.name], utilisation),
                         peak, steps)
            for name, tokens, length in workloads for recipe in (ORIGINAL, FAST_PATH)]


H200_ROWS = {"original_corpus_fp16": ORIGINAL, "fast_2x1_corpus_fp16": FAST_PATH, "fast_mb32_corpus_bf16": FAST_PATH}


def h200_utilisation(config, speed_reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fraction of the H200's peak each corpus row reached: tiny for the host-bound 2-sequence recipes."""
    rows = {r["name"]: r for report in speed_reports for r in report.get("rows", []) if r.get("name") in H200_ROWS}
    return [{"name": name, "tokens_per_step": row["tokens_per_step"], "seconds_per_step": row["seconds_per_step"],
             "utilisation": measured_utilisation(row, config, H200_ROWS[name], H200)}
            for name, row in rows.items()]
