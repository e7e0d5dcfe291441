"""The fast path's training step replayed from CUDA graphs, one per length bucket (opt-in: ``cuda_graphs``).

The original recipe's step (2 sequences, ~1,000 tokens) is bound by the CPU's kernel launches: the GPU waits for
thousands of small launches. ``GraphedStep`` captures each micro-batch's forward and backward pass once per shape
and replays it, so the step costs one graph launch plus the optimizer update (left outside the graph: bitsandbytes'
paged 8-bit update, GradScaler's inf check and the clipping run as before, eagerly).

A graph replays fixed shapes and fixed addresses, so:

- each micro-batch becomes one padding-free token stream padded up to the next multiple of ``graph_bucket_tokens``
  (at most micro-batch × max length); the padding is one more sequence of its own (attention never crosses
  sequences) whose labels are -100, so the loss and the gradients are those of the real tokens. One graph per
  (bucket, sequences): the sequence count fixes FlashAttention's batch, and its ``max_len`` is the bucket;
- inputs, labels, segment boundaries and the loss's denominator are copied into static tensors before a replay;
  the loss is the cross-entropy over every position with ``ignore_index=-100`` (``causal_lm_loss`` selects the
  labelled positions with a boolean mask, a host synchronisation a graph cannot hold);
- the LoRA gradients accumulate into static buffers (captured as ``grad += …``), given back to the parameters after
  every replay (``zero_grad(set_to_none=True)`` drops them between optimizer steps); fp16 scales the loss by
  GradScaler's own scale tensor inside the graph, and unscales outside;
- before capture, warm-up passes run on a side stream (PyTorch requires it: lazy initialisation, Triton's
  autotuning, FlashAttention's grouped-head check); all graphs share one memory pool;
- LoRA dropout draws from PyTorch's Philox generator, which graphs handle (each replay draws new masks). The
  checkpointed layers replay their forward masks in the backward pass by saving and restoring the generator's
  state, which is not allowed during capture: while capturing, that save and restore switch the generator between
  pre-registered generator states (``_GraphRng``), and before each replay the states that must repeat a draw are
  given the same Philox offset, every other one its own.

Not capturable, refused with the option to change: offloaded checkpoints (pinned memory on side streams), a CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from utils.speed.fastpath import checkpoint as checkpoint_module
from utils.speed.fastpath.attention import Segments, find_segments
from utils.speed.fastpath.backbone import FastPath, backbone_of
from utils.speed.fastpath.checkpoint import _CheckpointedLayer, _Recompute
from utils.speed.fastpath.layers import StepContext
from utils.speed.fastpath.options import FastPathError
from utils.train_step import Batch
from utils.units import GIB

RNG_STRIDE = 1 << 28  # Philox offsets between two independent generator states within one replay (multiple of 4)
# A checkpointed layer saves the generator 3 times per pass (2 in its forward, 1 in its backward) and restores it 3
# times; each costs one pre-registered state, and each registered state costs two small fills per replay
RNG_STATES_PER_LAYER = 6
LOSS_CHUNK_TOKENS = 512  # the loss's logits in chunks: (chunk × vocab) fp32 at a time instead of the whole pass


def bucket_length(tokens: int, bucket: int, max_tokens: int) -> int:
    """The graph length of a micro-batch of ``tokens`` real tokens: the next multiple of ``bucket``, at most
    ``max_tokens`` (micro-batch × max length)."""
    if tokens < 1:
        raise ValueError(f"a micro-batch of {tokens} tokens: nothing to train on.")
    if tokens > max_tokens:
        raise FastPathError(f"a micro-batch of {tokens} tokens is longer than the CUDA graphs' largest bucket "
                            f"({max_tokens} tokens = micro-batch × max length); shorten it, or raise max_tokens.")
    return min(-(-tokens // bucket) * bucket, max_tokens)


def bucket_lengths(bucket: int, max_tokens: int) -> list[int]:
    """Every length a graph can have: the multiples of ``bucket`` below ``max_tokens``, and ``max_tokens``."""
    return sorted({*range(bucket, max_tokens, bucket), max_tokens})


@dataclass
class FlatBatch:
    """One micro-batch as a padded, padding-free token stream (CPU tensors): what one graph replay reads."""

    ids: torch.Tensor  # long (L,)
    labels: torch.Tensor  # long (L,): -100 on the padding and on each sequence's first token
    positions: torch.Tensor  # long (L,): restart at 0 for every sequence (the padding is one more)
    segments: Segments  # on the CPU; count includes the padding's sequence
    tokens: int  # real tokens (the rest, up to L, is padding)

    @property
    def key(self) -> tuple[int, int]:
        """(length, sequences): a graph replays one of these shapes."""
        return self.ids.numel(), self.segments.count


def flatten_batch(batch: Batch, bucket: int, max_tokens: int) -> FlatBatch:
    """``batch`` (rows × seq, optional right padding or positions) as one stream padded to its bucket.

    The rows' real tokens in order; each row's first label becomes -100 (no row predicts its first token from the
    row before, as the per-row loss never does); the padding is a sequence of its own with labels -100.
    """
    ids, labels = batch.input_ids.cpu(), batch.labels.cpu()
    rows, seq = ids.shape
    valid = batch.attention_mask.cpu().bool() if batch.attention_mask is not None else torch.ones(rows, seq,
                                                                                                 dtype=torch.bool)
    positions = batch.position_ids.cpu() if batch.position_ids is not None else \
        (valid.long().cumsum(-1) - 1).clamp(min=0)
    first = valid.long().argmax(-1)
    starts = torch.zeros(rows, seq, dtype=torch.bool)
    starts[torch.arange(rows), first] = True
    labels = labels.clone()
    labels[torch.arange(rows), first] = -100
    ids, labels, positions, starts = ids[valid], labels[valid], positions[valid], starts[valid]
    tokens = ids.numel()
    pad = bucket_length(tokens, bucket, max_tokens) - tokens
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        labels = torch.cat([labels, labels.new_full((pad,), -100)])
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)])
        starts = torch.cat([starts, torch.arange(pad) == 0])
    return FlatBatch(ids, labels, positions, find_segments(positions, starts), tokens)


def flat_causal_loss(head_weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
                     num_items: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``causal_lm_loss`` over one stream (T × hidden) with fixed shapes: every position's cross-entropy, -100
    ignored, summed and divided by ``num_items`` (a tensor, so a replay can change it)."""
    h, target = hidden[:-1], labels[1:]
    weight = head_weight if head_weight.dtype == h.dtype else head_weight.to(h.dtype)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        logits = (h[start:start + chunk] @ weight.t()).float()
        total = total + F.cross_entropy(logits, target[start:start + chunk], ignore_index=-100, reduction="sum")
    return total / num_items


def graph_hidden(fast: FastPath, backbone: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                 segments: Segments) -> torch.Tensor:
    """``FastPath.run`` for one stream whose segments are given (found on the CPU): last hidden state (T × hidden).

    Same layers, checkpoints and kernels as ``FastPath.run``; ``find_segments`` on the GPU reads its result back to
    the host, which a graph cannot capture.
    """
    options = fast.options
    with torch.autocast(fast.device.type, enabled=False):
        x = backbone.embed_tokens(ids).to(fast.residual_dtype)
        if options.checkpoint:
            x = x.detach().requires_grad_(True)
        cos, sin = backbone.rotary_emb(x, positions.unsqueeze(0))
        kernels, attention = fast.pass_choices(ids.numel())
        step = StepContext(cos[0].to(fast.dtype), sin[0].to(fast.dtype), segments, backbone.training, kernels, True,
                           mlp_chunk=options.mlp_chunk_tokens, attention=attention)
        keep = fast.checkpoint_keep
        plan = _Recompute(options.skip_down_recompute, keep != "input", keep == "mid+qkv",
                          backbone.training and fast.dropout, len(fast.layers) - 1)
        for layer in fast.layers:
            if options.checkpoint:
                x = _CheckpointedLayer.apply(x, layer, step, fast.store, plan)
            else:
                x = layer.forward(x, step)
        return kernels.rms_norm(x, backbone.norm.weight, backbone.norm.variance_epsilon).to(fast.dtype)


def graph_unsupported_reason(fast: FastPath | None) -> str | None:
    """Why the fast path of a model cannot run as CUDA graphs (None: it can)."""
    if fast is None:
        return "the model has no fast path; call enable_fast_path first"
    if not fast.options.cuda_graphs:
        return "cuda_graphs is False in its FastPathOptions; set cuda_graphs=True (and offload_checkpoints=False)"
    if fast.device.type != "cuda":
        return (f"cuda_graphs=True needs a CUDA GPU (the model is on {fast.device}); set cuda_graphs=False or run "
                "on a GPU")
    if fast.store.offload:
        return "cuda_graphs=True cannot capture offloaded checkpoints; set offload_checkpoints=False"
    return None


@dataclass(frozen=True)
class _RngToken:
    """A saved generator state while capturing: the index of the pre-registered state its draws come from."""

    index: int


class _GraphRng:
    """Save and restore the CUDA generator inside a capture (the checkpointed layers' dropout masks).

    ``save`` switches the generator to a fresh pre-registered state, whose draws then start at its own offset;
    ``restore`` switches it to another fresh state told (``before_replay``) to start at the same offset as the
    saved one, so it draws the same masks. States are registered with the graph before capture, as PyTorch requires.
    """

    def __init__(self, device: torch.device, size: int):
        self.generator = torch.cuda.default_generators[device.index if device.index is not None
                                                       else torch.cuda.current_device()]
        self.original = self.generator.graphsafe_get_state()
        self.states = [self.generator.clone_state() for _ in range(size)]
        self.root: list[int] = []  # per used state: the state whose draws it repeats (itself for a fresh one)

    def register(self, graph: torch.cuda.CUDAGraph) -> None:
        for state in self.states:
            graph.register_generator_state(state)

    def _take(self, root: int | None) -> int:
        index = len(self.root)
        if index >= len(self.states):
            raise RuntimeError(f"CUDA graphs: more than {len(self.states)} generator saves in one capture; raise "
                               "utils.speed.graphs.RNG_STATES_PER_LAYER.")
        self.root.append(index if root is None else root)
        self.generator.graphsafe_set_state(self.states[index])
        return index

    def save(self, device: torch.device) -> _RngToken:
        return _RngToken(self._take(None))

    def restore(self, device: torch.device, token: _RngToken) -> None:
        self._take(self.root[token.index])

    def finish(self) -> None:
        """After capture: the generator draws from its own state again."""
        self.generator.graphsafe_set_state(self.original)

    def before_replay(self) -> None:
        """Offsets past every earlier draw: one per fresh state, the same for a state and the ones repeating it."""
        base = max(s.get_offset() for s in [self.generator, *self.states])
        base = -(-base // 4) * 4
        for index, state in enumerate(self.states):
            root = self.root[index] if index < len(self.root) else index
            state.set_offset(base + RNG_STRIDE * (root + 1))
        self.generator.set_offset(base + RNG_STRIDE * (len(self.states) + 1))


@contextmanager
def _graph_safe_rng(rng: _GraphRng | None) -> Iterator[None]:
    """While capturing: the checkpointed layers save and restore the generator through ``rng``."""
    if rng is None:
        yield
        return
    saved = checkpoint_module._rng_state, checkpoint_module._set_rng_state
    checkpoint_module._rng_state, checkpoint_module._set_rng_state = rng.save, rng.restore
    try:
        yield
    finally:
        checkpoint_module._rng_state, checkpoint_module._set_rng_state = saved
        rng.finish()


class _Replayed(torch.autograd.Function):
    """The replayed loss as a tensor ``backward()`` accepts (the replay has already written the gradients)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


@dataclass
class _Captured:
    """One graph and the static tensors it reads and writes."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    segments: Segments
    num_items: torch.Tensor
    graph: Any = None
    loss: torch.Tensor | None = None
    rng: _GraphRng | None = None
    replays: int = field(default=0)

    @classmethod
    def allocate(cls, flat: FlatBatch, device: torch.device) -> "_Captured":
        seg = flat.segments
        on = (lambda t: torch.zeros_like(t, device=device))  # noqa: E731
        segments = Segments(on(seg.cu_seqlens), flat.ids.numel(), seg.count, on(seg.index), on(seg.position))
        return cls(on(flat.ids), on(flat.labels), on(flat.positions), segments,
                   torch.ones((), dtype=torch.float32, device=device))

    def load(self, flat: FlatBatch, num_items: int) -> None:
        """Copy a micro-batch of this graph's shape into its static tensors."""
        for static, value in ((self.ids, flat.ids), (self.labels, flat.labels), (self.positions, flat.positions),
                              (self.segments.cu_seqlens, flat.segments.cu_seqlens),
                              (self.segments.index, flat.segments.index),
                              (self.segments.position, flat.segments.position)):
            static.copy_(value, non_blocking=True)
        self.num_items.fill_(float(num_items))


class GraphedStep:
    """The fast path's forward and backward pass of a micro-batch, replayed from a CUDA graph per shape.

    Called as the benchmark's loss function, ``step(batch, num_items)``: it replays (capturing first, for a new
    shape), leaves the micro-batch's gradients accumulated in the LoRA parameters' ``.grad`` and returns the loss;
    the ``backward()`` the training loop then calls on it does nothing more. The optimizer step stays outside.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter], scaler: Any = None,
                 max_tokens: int = 1024, warmup: int = 3):
        self.backbone = backbone_of(model)
        self.fast: FastPath = getattr(self.backbone, "_fast_path", None)
        reason = graph_unsupported_reason(self.fast)
        if reason:
            raise FastPathError(f"CUDA graphs: {reason}.")
        self.head_weight = getattr(model, "module", model).get_output_embeddings().weight
        self.params = list(params)
        self.grads = [torch.zeros_like(p) for p in self.params]  # static: every graph accumulates into these
        self.scaler = scaler
        self.max_tokens, self.bucket, self.warmup = max_tokens, self.fast.options.graph_bucket_tokens, warmup
        self.device = self.fast.device
        self.anchor = torch.zeros((), device=self.device, requires_grad=True)
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self.capture_reserved_bytes = 0

    def _attach(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def _forward_backward(self, c: _Captured) -> torch.Tensor:
        hidden = graph_hidden(self.fast, self.backbone, c.ids, c.positions, c.segments)
        loss = flat_causal_loss(self.head_weight, hidden, c.labels, c.num_items, chunk=LOSS_CHUNK_TOKENS)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _rng(self) -> _GraphRng | None:
        """Generator states for the checkpointed layers' dropout replay (None: no dropout or no recomputation)."""
        if not (self.fast.options.checkpoint and self.fast.dropout and self.backbone.training):
            return None
        return _GraphRng(self.device, RNG_STATES_PER_LAYER * len(self.fast.layers) + 2)

    def _capture(self, flat: FlatBatch) -> _Captured:
        """Warm up on a side stream with ``flat``, then capture its shape's graph (the gradients are kept as
        they were: the warm-up's are taken out again)."""
        torch.cuda.synchronize(self.device)
        started, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        c = _Captured.allocate(flat, self.device)
        c.load(flat, 1)
        self._attach()
        kept = [g.clone() for g in self.grads]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward_backward(c)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        c.graph, c.rng = torch.cuda.CUDAGraph(), self._rng()
        if c.rng is not None:
            c.rng.register(c.graph)
        with torch.cuda.graph(c.graph, pool=self.pool), _graph_safe_rng(c.rng):
            c.loss = self._forward_backward(c)
        for g, k in zip(self.grads, kept):
            g.copy_(k)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - started
        self.capture_reserved_bytes += torch.cuda.memory_reserved(self.device) - reserved
        self.graphs[flat.key] = c
        return c

    def prepare(self, batches: Sequence[Batch]) -> None:
        """Capture every shape ``batches`` need now (before a timed loop), then clear the gradients."""
        for batch in batches:
            flat = flatten_batch(batch, self.bucket, self.max_tokens)
            if flat.key not in self.graphs:
                self._capture(flat)
        torch._foreach_zero_(self.grads)
        for p in self.params:
            p.grad = None

    def __call__(self, batch: Batch, num_items: int) -> torch.Tensor:
        """Replay ``batch``'s graph: its gradients (over ``num_items`` label tokens) added to ``.grad``; its loss."""
        grad = self.params[0].grad
        if grad is None:  # a new optimizer step: zero_grad(set_to_none=True) dropped the gradients
            torch._foreach_zero_(self.grads)
        elif grad is not self.grads[0]:
            raise RuntimeError("CUDA graphs: the LoRA gradients were replaced outside the graphed step; clear them "
                               "with zero_grad(set_to_none=True) between optimizer steps.")
        flat = flatten_batch(batch, self.bucket, self.max_tokens)
        c = self.graphs.get(flat.key) or self._capture(flat)
        c.load(flat, num_items)
        if c.rng is not None:
            c.rng.before_replay()
        c.graph.replay()
        c.replays += 1
        self._attach()
        return _Replayed.apply(c.loss, self.anchor)

    def describe(self) -> dict[str, Any]:
        """The graphs captured: their shapes, replays, capture time and the memory their pool reserved."""
        return {"bucket_tokens": self.bucket, "max_tokens": self.max_tokens,
                "graphs": [{"tokens": k[0], "sequences": k[1], "replays": c.replays,
                            "rng_states": len(c.rng.root) if c.rng else 0} for k, c in sorted(self.graphs.items())],
                "capture_seconds": round(self.capture_seconds, 2),
                "capture_reserved_gib": round(self.capture_reserved_bytes / GIB, 3)}
