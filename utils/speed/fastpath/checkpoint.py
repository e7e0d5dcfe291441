"""Checkpointed decoder layers: what each layer keeps (``CheckpointStore``) and how it is recomputed."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from utils.speed.fastpath.layers import FastLayer, StepContext, _chunks


class CheckpointStore:
    """Keeps the checkpointed tensors of each layer: on the GPU, or in pinned CPU memory copied on side streams.

    Tensors are kept under a key, ``(layer index, slot)``: slot 0 is the layer's input, 1 the residual after
    attention, 2 the q/k/v projection. One pinned buffer per key is reused from step to step, so a second forward
    pass with gradients before the first one's backward would overwrite it: ``load`` detects that and raises
    instead of computing wrong grads.

    A GPU tensor being copied cannot be reused until its copy ends, so copies that fall behind the compute hold
    GPU memory: ``throttle`` makes the compute stream wait whenever they are more than ``lag`` layers behind.
    """

    def __init__(self, offload: bool, device: torch.device, lag: int = 2, exact_pinned: bool = False):
        self.offload = offload and device.type == "cuda"
        self.device = device
        self.lag = lag
        self.exact_pinned = exact_pinned
        self.copied: dict[int, Any] = {}  # layer index -> event recorded after that layer's copies
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.handles: dict[tuple, tuple] = {}
        self.generation: dict[tuple, int] = {}
        self.prefetched: dict[tuple, tuple[torch.Tensor, Any]] = {}  # key -> (GPU copy, copy-done event)
        if self.offload:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)

    def _buffer(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype:
            if buf is not None:  # copies queued on the side streams may still use the buffer it replaces
                self.d2h.synchronize()
                self.h2d.synchronize()
            buf = page_locked_empty(x.numel(), x.dtype) if self.exact_pinned else \
                torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
            self.buffers[key] = buf
        return buf[:x.numel()].view(x.shape)

    def save(self, key: tuple, x: torch.Tensor, on_gpu: bool = False) -> Any:
        """Keep ``x`` for the backward pass; ``on_gpu``: as it is, even when offloading (needed first)."""
        if not self.offload or on_gpu:
            return x
        buf = self._buffer(key, x)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            buf.copy_(x, non_blocking=True)
        x.record_stream(self.d2h)  # the caller may free x; its memory waits for the copy
        self.generation[key] = self.generation.get(key, 0) + 1
        self._drop_prefetch(key)
        handle = (key, buf, self.generation[key])
        self.handles[key] = handle
        return handle

    def throttle(self, index: int) -> None:
        """Before layer ``index`` runs: the compute stream waits for layer ``index - lag``'s copies to end."""
        event = self.copied.pop(index - self.lag, None) if self.offload else None
        if event is not None and not event.query():
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self, index: int) -> None:
        """After layer ``index``'s copies are queued: remember where they end."""
        if self.offload:
            event = torch.cuda.Event()
            event.record(self.d2h)
            self.copied[index] = event

    def prefetch(self, key: tuple) -> None:
        """Start copying ``key``'s tensor back to the GPU: the backward pass needs it next."""
        handle = self.handles.get(key)
        if not self.offload or handle is None or key in self.prefetched:
            return
        _, buf, _ = handle
        # Allocated on the compute stream, so its memory returns to that stream's pool (no per-stream reserve).
        # No record_stream: the compute stream waits for the copy before it uses or drops the tensor, so its
        # memory is free for reuse the moment the compute stream releases it (record_stream would hold it until
        # the copy stream's later work, the next layer's prefetch, had ended)
        x = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
        self.h2d.wait_stream(torch.cuda.current_stream(self.device))
        self.h2d.wait_stream(self.d2h)
        with torch.cuda.stream(self.h2d):
            x.copy_(buf, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.h2d)
        self.prefetched[key] = (x, event)

    def _drop_prefetch(self, key: tuple) -> None:
        """Forget a prefetched copy that was never loaded, after the compute stream has waited for its copy."""
        entry = self.prefetched.pop(key, None)
        if entry is not None:
            torch.cuda.current_stream(self.device).wait_event(entry[1])

    def load(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        key, buf, generation = handle
        if self.generation.get(key) != generation:
            raise RuntimeError(
                "fast path: a second forward pass with gradients ran before the backward pass of the first one; "
                "run backward after each forward (gradient accumulation does), or use offload_checkpoints=False."
            )
        stream = torch.cuda.current_stream(self.device)
        if key in self.prefetched:
            x, event = self.prefetched.pop(key)
            stream.wait_event(event)
            return x
        stream.wait_stream(self.d2h)
        return buf.to(self.device, non_blocking=True)


def page_locked_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of exactly ``numel`` elements whose memory is page-locked (``cudaHostRegister``), so copies to and
    from the GPU run asynchronously as from PyTorch's pinned memory, without its rounding up to a power of two. The
    pages are unregistered when the tensor is freed."""
    tensor = torch.empty(numel, dtype=dtype)
    size = tensor.numel() * tensor.element_size()
    if size:
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(tensor.data_ptr(), size, 0))
        if error:
            raise RuntimeError(f"cudaHostRegister of {size / 2**20:.0f} MiB failed (CUDA error {error}): the host "
                               "may limit page-locked memory (ulimit -l); use FastPathOptions(exact_pinned=False).")
        weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor


@dataclass(frozen=True)
class _Recompute:
    """How a checkpointed layer is recomputed."""

    skip_down: bool  # no forward GEMM for down_proj's frozen weight
    mid: bool  # the residual after attention is kept too: no forward GEMM for o_proj's frozen weight either
    qkv: bool  # the q/k/v projection is kept too (with mid): no q/k/v GEMM, LoRA or RMSNorm forward work
    rng: bool  # LoRA dropout is on: replay the forward pass's random masks
    last: int  # the last layer's index: its checkpoints stay on the GPU (the backward pass starts with them)


class _CheckpointedLayer(torch.autograd.Function):
    """Run a layer without keeping its activations; recompute them, one half at a time, for the backward pass.

    The backward pass recomputes the MLP half and runs its backward, then the attention half: only one half's
    activations are alive at a time. The frozen GEMMs whose outputs only feed the residual stream (down_proj, and
    o_proj when the residual after attention is kept) are not recomputed: the backward pass never reads them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: FastLayer, step: StepContext, store: CheckpointStore,
                plan: _Recompute) -> torch.Tensor:
        ctx.layer, ctx.step, ctx.store, ctx.plan = layer, step, store, plan
        ctx.rng = _rng_state(x.device) if plan.rng else None
        on_gpu = layer.index == plan.last
        store.throttle(layer.index)
        ctx.handle = store.save((layer.index, 0), x, on_gpu)
        with torch.no_grad():
            qkv = layer.qkv_projection(x, step)
            ctx.qkv = store.save((layer.index, 2), qkv, on_gpu) if plan.qkv else None
            mid = x + layer.attend(qkv, step)
            del qkv
            ctx.rng_mid = _rng_state(x.device) if plan.rng else None
            ctx.mid = store.save((layer.index, 1), mid, on_gpu) if plan.mid else None
            store.mark(layer.index)
            return layer.mlp_residual(mid, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer, step, store, plan = ctx.layer, ctx.step, ctx.store, ctx.plan
        # The previous layer's checkpoints, in the order they are needed: the slots it kept (its plan may differ from
        # this layer's, ``FastPathOptions.keep_layers``); prefetch skips those it did not keep
        for slot in (1, 2, 0):
            store.prefetch((layer.index - 1, slot))
        # The first layer's input is the embedding, detached (frozen): its gradient would go nowhere, so neither
        # the input-gradient GEMMs of q/k/v nor the RMSNorm backward run for it
        input_grad = layer.index > 0
        restore = _rng_state(grad.device) if plan.rng else None
        with torch.enable_grad():
            attention = None
            if ctx.mid is not None:
                mid = store.load(ctx.mid)
            else:
                x = store.load(ctx.handle).detach().requires_grad_(input_grad)
                if plan.rng:
                    _set_rng_state(x.device, ctx.rng)
                attention = layer.attention(x, step)
                with torch.no_grad():
                    mid = x + attention
            if plan.rng:
                _set_rng_state(grad.device, ctx.rng_mid)
            grad_mid = _mlp_backward(layer, step, mid.detach(), grad, "skip" if plan.skip_down else "mm")
            del mid
            if attention is None:
                x = store.load(ctx.handle).detach().requires_grad_(input_grad)
                if plan.rng:
                    _set_rng_state(x.device, ctx.rng)
                if ctx.qkv is None:
                    _backward(layer.attention(x, step, o="skip"), grad_mid)
                else:  # the projection's graph first (its dropout mask comes first), its values from the checkpoint
                    projection = layer.qkv_projection(x, step, base="skip")
                    qkv = store.load(ctx.qkv).detach().requires_grad_(True)
                    torch.autograd.backward(layer.attend(qkv, step, o="skip"), grad_mid)
                    _backward(projection, qkv.grad)
                    del qkv, projection
            else:
                _backward(attention, grad_mid)
        if restore is not None:
            _set_rng_state(grad.device, restore)
        return (x.grad.add_(grad_mid) if input_grad else None), None, None, None, None


def _mlp_backward(layer: FastLayer, step: StepContext, mid: torch.Tensor, grad: torch.Tensor,
                  down: str) -> torch.Tensor:
    """Recompute the MLP over ``mid`` chunk by chunk (as the forward pass ran it) and backpropagate ``grad``.

    Returns the gradient of ``mid``: the MLP's plus ``grad`` itself (the residual connection passes it on).
    """
    chunks = _chunks(mid.shape[0], step.mlp_chunk)
    if len(chunks) == 1:
        mid.requires_grad_(True)
        torch.autograd.backward(layer.mlp(mid, step, down), grad)
        return mid.grad.add_(grad)
    grad_mid = torch.empty_like(grad)
    for rows in chunks:
        part = mid[rows].requires_grad_(True)
        torch.autograd.backward(layer.mlp(part, step, down), grad[rows])
        torch.add(part.grad, grad[rows], out=grad_mid[rows])
    return grad_mid


def _backward(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate ``grad`` unless nothing upstream of ``output`` is trained (the first layer without LoRA)."""
    if output.requires_grad:
        torch.autograd.backward(output, grad)


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
