"""What quantisation costs in quality: completion loss on the test split, reconstruction error of the weights."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import bitsandbytes.functional as bnbf
import pandas as pd
import torch

from utils.config import THESIS
from utils.data import completion_mask
from utils.memory.analytic import ATTENTION_MODULES, BLOCKSIZE_4BIT, LINEAR_MODULES, module_kind


def completion_loss(model, tokenizer, conversations: Sequence[Sequence[dict]],
                    max_seq_length: int = THESIS.max_seq_length) -> dict:
    """Mean negative log-likelihood of the answers (completion tokens only) and its perplexity.

    The loss mask is TRL's prompt–completion mask (``utils.data.completion_mask``); examples are cut to
    ``max_seq_length`` tokens like in training. Returns ``loss``, ``perplexity``, ``tokens`` and ``examples``.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            ids, mask = completion_mask(tokenizer, messages)
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            labels = [t if m else -100 for t, m in zip(ids, mask)]
            n = sum(1 for t in labels[1:] if t != -100)  # predicted tokens after the shift
            if n == 0:
                continue
            out = model(
                input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device)
            )
            total_nll += float(out.loss) * n
            total_tokens += n
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens, "examples": len(conversations)}


def linear_weights(model, layers: int = 0) -> Iterable[tuple[int, str, torch.Tensor]]:
    """``(layer, module, weight)`` of the seven linear layers; ``layers > 0`` samples that many layers evenly."""
    decoder = model.model.layers
    n = len(decoder)
    if layers <= 0 or layers >= n:
        chosen = list(range(n))
    elif layers == 1:
        chosen = [0]
    else:  # evenly spaced, first and last included
        chosen = sorted({round(i * (n - 1) / (layers - 1)) for i in range(layers)})
    for idx in chosen:
        layer = decoder[idx]
        for module in LINEAR_MODULES:
            parent = layer.self_attn if module in ATTENTION_MODULES else layer.mlp
            yield idx, module, getattr(parent, module).weight.detach()


def quantization_errors(model, quant_types: Sequence[str] = ("nf4", "fp4", "nf4_dq"), layers: int = 0
                        ) -> pd.DataFrame:
    """DataFrame: relative reconstruction error ‖W − deq(quant(W))‖ / ‖W‖ per linear weight and 4-bit type.

    Uses bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (blocks of 64; ``nf4_dq`` also
    quantises the absmax constants), on fp32 copies of the model's weights.
    """
    rows = []
    for layer, module, weight in linear_weights(model, layers):
        w = weight.float()
        norm = w.norm().item()
        for qt in quant_types:
            packed, state = bnbf.quantize_4bit(
                w, blocksize=BLOCKSIZE_4BIT, quant_type=qt.replace("_dq", ""), compress_statistics=qt.endswith("_dq")
            )
            rec = bnbf.dequantize_4bit(packed, state).float()
            rows.append({
                "capa": layer, "módulo": module, "tipo": module_kind(module), "formato": qt,
                "error_relativo": (rec - w).norm().item() / norm, "parametros": w.numel(),
            })
    return pd.DataFrame(rows)
