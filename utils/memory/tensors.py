"""What a loaded model's tensors hold: parameters per kind (4-bit unpacked) and bitsandbytes' hidden constants."""

from __future__ import annotations

import torch


def tensor_kind(name: str) -> str:
    """Kind of a parameter from its name: embedding, attention, mlp, norms, lm_head, lora or other."""
    if "lora_" in name:
        return "lora"
    if "embed_tokens" in name:
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def unpacked_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter holds: a 4-bit ``Params4bit`` packs two per byte of storage."""
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def measured_parameter_counts(model, unpack_4bit: bool = True) -> dict[str, int]:
    """Parameters per kind from a model's tensors (``unpack_4bit=False`` gives the raw, packed numel)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        kind = tensor_kind(name)
        counts[kind] = counts.get(kind, 0) + (unpacked_numel(param) if unpack_4bit else param.numel())
    return counts


def quant_state_bytes(model) -> int:
    """Bytes bitsandbytes keeps outside ``parameters()``: 4-bit absmax/code/offset and int8 row scales."""
    tensors: dict[int, torch.Tensor] = {}  # by id: a tensor shared by several parameters counts once
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        held = [getattr(param, "SCB", None)]
        if state is not None:
            held += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                held += [state.state2.absmax, state.state2.code]
        tensors.update((id(t), t) for t in held if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in tensors.values())
