"""The backbone forward of the fast path, and switching it on and off."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from utils.speed.fastpath.attention import _FLASH, ATTENTION_KERNELS, cudnn_supported, find_segments, varlen_supported
from utils.speed.fastpath.checkpoint import CheckpointStore, _CheckpointedLayer, _Recompute
from utils.speed.fastpath.layers import FastLayer, StepContext
from utils.speed.fastpath.ops import KERNELS, resolve_kernels
from utils.speed.fastpath.options import FastPathError, FastPathOptions


class FastPath:
    """The fused layers of one model and the state the forward pass needs."""

    def __init__(self, backbone: torch.nn.Module, dtype: torch.dtype, options: FastPathOptions):
        config = backbone.config
        reason = unsupported_reason(backbone)
        if reason:
            raise FastPathError(f"{reason}. Train it with fast_path='off'.")
        device = backbone.embed_tokens.weight.device
        self.device = device
        self.dtype = dtype
        self.options = options
        self.kernels = resolve_kernels(options.kernels, device)
        if not options.fused_lora:
            self.kernels = dataclasses.replace(self.kernels, fused_lora=False)
        self.small_kernels = KERNELS["torch"] if options.kernels == "auto" else self.kernels
        attention = options.attention
        if attention == "auto":
            attention = "varlen" if varlen_supported(device, dtype) else "sdpa"
        elif attention == "varlen" and not varlen_supported(device, dtype):
            raise FastPathError("attention='varlen' needs an Ampere-or-newer GPU, fp16/bf16 and PyTorch's "
                                "FlashAttention kernels (torch.ops.aten._flash_attention_forward); use attention='sdpa' or 'auto'.")
        elif attention == "cudnn" and not cudnn_supported(device, dtype):
            raise FastPathError("attention='cudnn' needs an Ampere-or-newer GPU, fp16/bf16 and PyTorch's cuDNN "
                                "attention (torch.nn.attention.SDPBackend.CUDNN_ATTENTION); use attention='auto'.")
        self.attention = attention
        # "auto" where cuDNN's attention runs: its kernel for passes of ``small_pass_tokens`` or more whose rows share
        # one length, FlashAttention's varlen for the rest (attention_cudnn's own rule). Smaller passes keep the
        # direct FlashAttention call: they are bound by the CPU's launches, and SDPA's dispatch costs more CPU. Not
        # with CUDA graphs: cuDNN refusing a shape mid-capture would break the capture rather than fall back
        self.large_attention = attention
        if options.attention == "auto" and attention == "varlen" and not options.cuda_graphs \
                and cudnn_supported(device, dtype):
            self.large_attention = "cudnn"
        self.residual_dtype = torch.float32 if options.fp32_residual else dtype
        self.layers = [FastLayer(layer, i, config, dtype, attention)
                       for i, layer in enumerate(backbone.layers)]
        self.store = CheckpointStore(options.offload_checkpoints, device, exact_pinned=options.exact_pinned)
        keep = options.checkpoint_keep
        self.checkpoint_keep = ("mid+qkv" if self.store.offload else "input") if keep == "auto" else keep
        self.dropout = any(p.dropout > 0 for layer in self.layers
                           for p in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def recompute_plans(self, training: bool) -> list[_Recompute]:
        """Each layer's recomputation plan: what it keeps (``checkpoint_keep``; only the first ``keep_layers`` layers
        keep more than their input) and whether it replays dropout masks."""
        keep, first = self.checkpoint_keep, self.options.keep_layers
        last = len(self.layers) - 1
        plans = []
        for index in range(len(self.layers)):
            layer_keep = keep if first is None or index < first else "input"
            plans.append(_Recompute(self.options.skip_down_recompute, layer_keep != "input", layer_keep == "mid+qkv",
                                    training and self.dropout, last))
        return plans

    def pass_choices(self, tokens: int) -> tuple[Any, Any]:
        """The kernel set and the attention kernel of a pass of ``tokens`` tokens (None: the layers' own kernel)."""
        if tokens < self.options.small_pass_tokens:
            return self.small_kernels, None
        return self.kernels, ATTENTION_KERNELS[self.large_attention]

    def describe(self) -> dict[str, Any]:
        """The resolved choices, for run records."""
        kernels = self.kernels.name
        if self.small_kernels is not self.kernels:
            kernels += f" ({self.small_kernels.name} below {self.options.small_pass_tokens} tokens per pass)"
        attention = self.attention
        if self.large_attention != self.attention:
            attention += (f" ({self.large_attention} for passes of {self.options.small_pass_tokens} tokens or more "
                          "whose rows share one length)")
        return {"kernels": kernels, "attention": attention,
                "compute_dtype": str(self.dtype).replace("torch.", ""),
                "residual_dtype": str(self.residual_dtype).replace("torch.", ""),
                "checkpoint": self.options.checkpoint, "offload_checkpoints": self.store.offload,
                "skip_down_recompute": self.options.skip_down_recompute, "checkpoint_keep": self.checkpoint_keep,
                "keep_layers": self.options.keep_layers, "exact_pinned": self.store.exact_pinned,
                "mlp_chunk_tokens": self.options.mlp_chunk_tokens, "fused_lora": self.kernels.fused_lora,
                "native_gqa": _FLASH.get("native_gqa")}

    def run(self, backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None) -> torch.Tensor:
        """input ids (B × S) → last hidden state (B × S × hidden), padding positions zero."""
        batch, seq = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0) if valid is not None else \
                torch.arange(seq, device=input_ids.device).expand(batch, seq)
        row_starts = torch.zeros(batch, seq, dtype=torch.bool, device=input_ids.device)
        if valid is not None:
            first = valid.long().argmax(-1)
            row_starts[torch.arange(batch, device=input_ids.device), first] = True
            ids, pos, row_starts = input_ids[valid], position_ids[valid], row_starts[valid]
        else:
            row_starts[:, 0] = True
            ids, pos, row_starts = input_ids.reshape(-1), position_ids.reshape(-1), row_starts.reshape(-1)
        segments = find_segments(pos, row_starts)
        training = backbone.training
        grad = torch.is_grad_enabled()
        with torch.autocast(self.device.type, enabled=False):
            x = backbone.embed_tokens(ids).to(self.residual_dtype)
            if grad and self.options.checkpoint:
                x = x.detach().requires_grad_(True)  # so the checkpointed layers' backward runs
            cos, sin = backbone.rotary_emb(x, pos.unsqueeze(0))
            kernels, attention = self.pass_choices(ids.numel())
            step = StepContext(cos[0].to(self.dtype), sin[0].to(self.dtype), segments, training, kernels, grad,
                               mlp_chunk=self.options.mlp_chunk_tokens, attention=attention)
            plans = self.recompute_plans(training)
            for layer in self.layers:
                if grad and self.options.checkpoint:
                    x = _CheckpointedLayer.apply(x, layer, step, self.store, plans[layer.index])
                else:
                    x = layer.forward(x, step)  # without checkpoints autograd keeps what it needs
            x = kernels.rms_norm(x, backbone.norm.weight, backbone.norm.variance_epsilon).to(self.dtype)
        if valid is None:
            return x.view(batch, seq, -1)
        out = x.new_zeros(batch, seq, x.shape[-1])
        out[valid] = x
        return out


def _fast_backbone_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                           use_cache=None, **kwargs):
    """Replacement forward of a Llama backbone: the fast path for training and cache-free evaluation."""
    # Imported here, not at the top: ``utils.speed`` loads in the benchmark's child processes before Unsloth, which
    # must be imported before transformers (it patches transformers as it loads)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    wants_more = kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
    if input_ids is None or inputs_embeds is not None or use_cache or cache is not None or wants_more:
        return self._original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise FastPathError("the fast path takes a 2-D padding mask (batch × seq) or none (padding-free batches).")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    hidden = self._fast_path.run(self, input_ids, attention_mask, position_ids)
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlamaModel`` inside a causal LM, a PEFT model, or a DDP wrapper of either."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    backbone = getattr(inner, "model", inner)
    if not hasattr(backbone, "layers") or not hasattr(backbone, "embed_tokens"):
        raise FastPathError(f"cannot find the decoder layers of {type(model).__name__}; the fast path needs a "
                            "Llama causal LM (optionally wrapped by PEFT).")
    return backbone


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the fast path (None when it can): checked before a trainer is built."""
    config = getattr(getattr(model, "module", model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        return f"the fast path supports Llama models (model_type 'llama'), not {model_type!r}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the fast path supports Llama layers without biases"
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        return "the fast path does not support 8-bit weights (use nf4_dq, nf4, fp4 or 16-bit)"
    return None


def enable_fast_path(model: torch.nn.Module, dtype: torch.dtype | None = None,
                     options: FastPathOptions | None = None) -> FastPath:
    """Switch ``model``'s backbone to the fast forward (call after ``get_peft_model``); returns its state.

    The fused layers hold references to the active adapter's LoRA tensors: after loading or switching
    adapters, call it again. ``disable_fast_path`` restores the original forward.
    """
    backbone = backbone_of(model)
    if dtype is None:
        state = getattr(backbone.layers[0].self_attn.q_proj, "base_layer", backbone.layers[0].self_attn.q_proj)
        dtype = getattr(state, "compute_dtype", None) or backbone.embed_tokens.weight.dtype
        if dtype == torch.float32 and backbone.embed_tokens.weight.device.type == "cuda":
            dtype = torch.bfloat16
    fast = FastPath(backbone, dtype, options or FastPathOptions())
    if not hasattr(backbone, "_original_forward"):
        backbone._original_forward = backbone.forward
    backbone._fast_path = fast
    backbone.forward = types.MethodType(_fast_backbone_forward, backbone)
    return fast


def disable_fast_path(model: torch.nn.Module) -> None:
    """Give the backbone its original forward back."""
    backbone = backbone_of(model)
    if hasattr(backbone, "_original_forward"):
        backbone.forward = backbone._original_forward
        del backbone._original_forward
        del backbone._fast_path
