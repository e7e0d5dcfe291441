"""Analytic memory of a causal LM from its architecture alone (``config.json``).

Parameter counts per tensor kind, the exact bytes of each storage format (bitsandbytes' quantisation constants
included) and the bytes of one LoRA training step by component. Dtypes are named ``"fp32"``, ``"fp16"``,
``"bf16"`` (``utils.device``).
"""

from __future__ import annotations

import math
from typing import Sequence

from utils.config import THESIS

FORMATS = ("fp32", "fp16", "bf16", "int8", "fp4", "nf4", "nf4_dq")
QUANTIZED = ("int8", "fp4", "nf4", "nf4_dq")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

BLOCKSIZE_4BIT = 64  # bitsandbytes' default 4-bit block (one absmax constant per 64 weights)
BLOCKSIZE_DQ = 256  # second level of double quantisation: one fp32 constant per 256 absmax values
BLOCKSIZE_ADAM8 = 256  # bitsandbytes' blockwise 8-bit optimizer states
CODE_4BIT_BYTES = 16 * 4  # the 16-value NF4/FP4 lookup table each QuantState carries (fp32)
CODE_8BIT_BYTES = 256 * 4  # double quantisation's 8-bit dynamic code, one copy per tensor (fp32)
ADAM8_MIN_SIZE = 4096  # smaller tensors keep 32-bit optimizer states (bitsandbytes' min_8bit_size)
PAGED_MIN_SIZE = 100_000  # a paged optimizer pages the two 8-bit states of tensors this large or larger

TENSOR_KINDS = ("embedding", "attention", "mlp", "norms", "lm_head")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES

TRAIN_VARIANTS = {
    "prepare": "con prepare_model_for_kbit_training (activa gradient checkpointing, sube a fp32 lo no cuantizado)",
    "no_prepare_gc": "sin prepare, gradient checkpointing activado a mano",
    "no_prepare": "sin prepare ni gradient checkpointing (la línea quitada del script)",
}


# --------------------------------------------------------------------------------------------
# Architecture: parameter counts per tensor kind
# --------------------------------------------------------------------------------------------


def head_dim(config) -> int:
    """Size of one attention head (``head_dim``, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each of the seven linear layers of one decoder layer."""
    h, i, hd = config.hidden_size, config.intermediate_size, head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }


def module_kind(module: str) -> str:
    """``"attention"`` or ``"mlp"`` for one of the seven linear modules."""
    return "attention" if module in ATTENTION_MODULES else "mlp"


def analytic_parameter_counts(config) -> dict[str, int]:
    """Parameters per tensor kind from the architecture alone (tied embeddings counted once)."""
    layers, h = config.num_hidden_layers, config.hidden_size
    counts = dict.fromkeys(TENSOR_KINDS, 0)
    counts["embedding"] = config.vocab_size * h
    if not getattr(config, "tie_word_embeddings", False):
        counts["lm_head"] = config.vocab_size * h
    bias = {"attention": getattr(config, "attention_bias", False), "mlp": getattr(config, "mlp_bias", False)}
    for module, (out_f, in_f) in linear_shapes(config).items():
        kind = module_kind(module)
        # o_proj carries a bias too when attention_bias is set (Llama's convention)
        counts[kind] += layers * (out_f * in_f + (out_f if bias[kind] else 0))
    counts["norms"] = (2 * layers + 1) * h
    return counts


def config_dict(config) -> dict:
    """The architecture fields two configs must share to be the same model shape."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    return {k: getattr(config, k) for k in keys} | {"head_dim": head_dim(config)}


# --------------------------------------------------------------------------------------------
# Analytic bytes per storage format
# --------------------------------------------------------------------------------------------


def four_bit_constant_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of the quantisation constants of one 4-bit tensor (bitsandbytes' QuantState).

    One fp32 absmax per block of 64 weights; with double quantisation the absmax values are stored as
    uint8 plus, per 256 of them, one fp32 second-level absmax, one fp32 offset and the 256-entry fp32
    table of the 8-bit code. Each tensor also carries the 16-entry fp32 table of its 4-bit code.
    """
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    if not double_quant:
        return blocks * 4 + CODE_4BIT_BYTES
    return blocks * 1 + math.ceil(blocks / BLOCKSIZE_DQ) * 4 + 4 + CODE_8BIT_BYTES + CODE_4BIT_BYTES


def _linear_bytes(numel: int, out_f: int, fmt: str) -> tuple[int, int]:
    """``(data, constants)`` bytes of one linear weight of ``numel`` values stored in ``fmt``."""
    if fmt in DTYPE_BYTES:
        return numel * DTYPE_BYTES[fmt], 0
    if fmt == "int8":
        return numel, out_f * 4  # one fp32 scale per output row (SCB)
    return math.ceil(numel / 2), four_bit_constant_bytes(numel, fmt == "nf4_dq")


def analytic_weight_bytes(config, fmt: str, other_dtype: str = "bf16") -> dict[str, int]:
    """Exact bytes of the weights of a Llama-architecture model stored in ``fmt``.

    ``other_dtype`` is the dtype of what bitsandbytes does not quantise (embeddings, norms, an untied
    ``lm_head``) in the int8/4-bit formats: the ``dtype`` the model is loaded with. Returns the parts
    ``linear_data``, ``linear_constants``, ``embedding``, ``norms``, ``lm_head``, ``buffers`` and ``total``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: use one of {FORMATS}")
    counts = analytic_parameter_counts(config)
    plain = DTYPE_BYTES[fmt] if fmt in DTYPE_BYTES else DTYPE_BYTES[other_dtype]
    parts = {
        "linear_data": 0,
        "linear_constants": 0,
        "embedding": counts["embedding"] * plain,
        "norms": counts["norms"] * plain,
        "lm_head": counts["lm_head"] * plain,
        # the rotary buffers inv_freq and original_inv_freq (fp32, head_dim / 2 values each)
        "buffers": 2 * (head_dim(config) // 2) * 4,
    }
    for out_f, in_f in linear_shapes(config).values():
        data, constants = _linear_bytes(out_f * in_f, out_f, fmt)
        parts["linear_data"] += data * config.num_hidden_layers
        parts["linear_constants"] += constants * config.num_hidden_layers
    # biases (none in Llama-3.2) stay in the plain dtype
    bias = (counts["attention"] + counts["mlp"]) - config.num_hidden_layers * sum(
        o * i for o, i in linear_shapes(config).values()
    )
    parts["linear_data"] += bias * plain
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------
# Training step: analytic breakdown
# --------------------------------------------------------------------------------------------


def lora_tensor_shapes(config, r: int = THESIS.lora_r, target_modules: Sequence[str] = THESIS.target_modules):
    """Shapes of every LoRA tensor (A: r × in, B: out × r) of a Llama config, one entry per tensor."""
    shapes = []
    for module, (out_f, in_f) in linear_shapes(config).items():
        if module in target_modules:
            shapes += [(r, in_f), (out_f, r)] * config.num_hidden_layers
    return shapes


def optimizer_state_bytes(shapes: Sequence[tuple[int, int]], optim: str) -> int:
    """Bytes of the optimizer states for trainable tensors of these shapes.

    ``adamw_torch``: two fp32 moments (8 bytes per parameter). ``paged_adamw_8bit`` / ``adamw_8bit``:
    two uint8 moments, each with one fp32 absmax per 256 values and its own 256-entry fp32 code table
    (tensors under 4096 values stay 32-bit).
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optim in {"paged_adamw_8bit", "adamw_8bit"} and n >= ADAM8_MIN_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BLOCKSIZE_ADAM8) + CODE_8BIT_BYTES)
        else:
            total += 8 * n
    return total


def _activation_bytes(config, tokens: int, cbytes: int, residual_bytes: int, checkpointing: bool) -> dict[str, int]:
    """Estimated activations of one step: checkpointed layer inputs, saved layer tensors, logits."""
    layers, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * head_dim(config)
    # One layer's saved tensors: ~16 hidden-sized and 5 intermediate-sized tensors (norm inputs/outputs,
    # q/k/v/o and their LoRA dropout copies, attention output; gate, up, act, product, down's dropout copy),
    # plus 1-byte dropout masks.
    per_layer = tokens * ((16 * h + 2 * kv + 5 * i) * cbytes + (6 * h + i))
    return {
        "checkpoints": layers * tokens * h * residual_bytes if checkpointing else 0,
        "layer_activations": per_layer if checkpointing else per_layer * layers,
        "logits": tokens * config.vocab_size * (cbytes + 4 + 4),
    }


def analytic_training_breakdown(
    config,
    fmt: str = "nf4_dq",
    variant: str = "prepare",
    compute_dtype: str = "fp16",
    autocast: bool = True,
    max_seq_length: int = THESIS.max_seq_length,
    batch_size: int = THESIS.per_device_train_batch_size,
    r: int = THESIS.lora_r,
    target_modules: Sequence[str] = THESIS.target_modules,
    optim: str = THESIS.optim,
    cuda: bool = True,
) -> dict[str, float]:
    """Bytes of one LoRA training step by component (an estimate where the component is an activation).

    Exact: weights (storage format; ``prepare`` stores what is not quantised in fp32), LoRA parameters and
    gradients (fp32, as PEFT keeps adapters), optimizer states. Estimated: the fp16/bf16 copy autocast makes
    of fp32-stored embeddings for the tied ``lm_head`` (kept for backward), the checkpointed layer inputs,
    one decoder layer's saved activations (×L without checkpointing), and the logits (compute dtype, the
    fp32 upcast of the loss and its log-softmax/gradient). ``optimizer_paged`` is the part of the optimizer
    states a paged optimizer keeps in CUDA unified memory (tensors of 10⁵ values or more), which
    ``torch.cuda.memory_allocated`` does not count: ``total`` leaves it out.
    """
    cbytes = DTYPE_BYTES[compute_dtype] if autocast else 4
    quantized = fmt in QUANTIZED
    other = "fp32" if (variant == "prepare" and quantized) else (compute_dtype if quantized else fmt)
    shapes = lora_tensor_shapes(config, r, target_modules)
    n_lora = sum(math.prod(s) for s in shapes)
    storage_bytes = DTYPE_BYTES[other] if quantized else DTYPE_BYTES[fmt]
    parts = {
        "weights": analytic_weight_bytes(config, fmt, other)["total"],
        "lora_params": 4 * n_lora,
        "lora_grads": 4 * n_lora,
        "optimizer_states": optimizer_state_bytes(shapes, optim),
        "lm_head_cast": config.vocab_size * config.hidden_size * cbytes if (autocast and storage_bytes != cbytes)
        else 0,
        **_activation_bytes(config, max_seq_length * batch_size, cbytes, max(storage_bytes, cbytes),
                            checkpointing=variant in {"prepare", "no_prepare_gc"}),
    }
    paged = optim.startswith("paged") and cuda
    parts["optimizer_paged"] = sum(2 * math.prod(s) for s in shapes if math.prod(s) >= PAGED_MIN_SIZE) if paged else 0
    parts["total"] = sum(v for k, v in parts.items() if k != "optimizer_paged") - parts["optimizer_paged"]
    return parts
