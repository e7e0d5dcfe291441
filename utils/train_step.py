"""The one optimizer factory and the one measured training loop (notebook 02's step and the speed benchmark).

``python -m utils.training`` and notebook 04 train through TRL's ``SFTTrainer``; the memory measurement of
notebook 02 and the speed benchmark need a bare loop whose every step they can time and whose peak they can
read, and both use ``run_optimizer_steps``: the same micro-batches, the same fp16 loss scaling, clipping and
optimizer step as the trainer.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import bitsandbytes as bnb
import torch

from utils.config import THESIS
from utils.speed.optim import build_flat_paged_adamw_8bit

OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_8bit_flat", "adamw_torch", "adamw_torch_fused")


def build_optimizer(params: list, optim: str, lr: float = THESIS.learning_rate,
                    weight_decay: float = THESIS.weight_decay) -> torch.optim.Optimizer:
    """An optimizer by the name the settings use.

    ``paged_adamw_8bit`` / ``adamw_8bit``: bitsandbytes, tensor by tensor (the original's); ``paged_adamw_8bit_flat``:
    the same update over one flat buffer (``utils.speed.optim``); ``adamw_torch`` / ``adamw_torch_fused``: PyTorch's.
    """
    if optim == "paged_adamw_8bit_flat":
        return build_flat_paged_adamw_8bit(params, lr=lr, weight_decay=weight_decay)
    if optim in {"paged_adamw_8bit", "adamw_8bit"}:
        cls = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": it falls back
            return cls(params, lr=lr, weight_decay=weight_decay)
    if optim in {"adamw_torch", "adamw_torch_fused"}:
        fused = optim == "adamw_torch_fused" and torch.cuda.is_available()
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"optim={optim!r}: use one of {', '.join(OPTIMIZERS)}")


def clip_and_step(params: list, optimizer, scaler=None, max_grad_norm: float = THESIS.max_grad_norm) -> None:
    """One optimizer step as the trainer does it: unscale (fp16), clip the norm, step, clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Batch:
    """One micro-batch: ids (B × S), labels, optional padding mask and position ids, real-token count."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    tokens: int = 0

    def to(self, device: str | torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                     self.tokens)

    @property
    def label_tokens(self) -> int:
        """Tokens that carry a loss (labels after the shift that are not -100)."""
        return int((self.labels[:, 1:] != -100).sum())


@dataclass
class StepLog:
    """What ``run_optimizer_steps`` saw: per step loss, tokens and time; the gradients' bytes at the last step."""

    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # the measured steps only (after the warm-up)
    grad_bytes: int = 0
    warmup: int = 0

    @property
    def seconds_per_step(self) -> float | None:
        """Median seconds of the measured steps."""
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def tokens_per_second(self) -> float | None:
        """Real tokens over real time: sum of tokens / sum of seconds of the measured steps."""
        return sum(self.tokens[self.warmup:]) / sum(self.seconds) if self.seconds else None


def tensor_bytes(tensors) -> int:
    """Bytes held by the tensors of an iterable (anything else in it is skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_optimizer_steps(
    plan: Sequence[Sequence[Batch]],
    loss_fn: Callable[[Batch, int], torch.Tensor],
    params: list,
    optimizer,
    device: str | torch.device,
    scaler=None,
    scheduler=None,
    warmup: int = 0,
    step_hook: Callable[[int], Any] | None = None,
    max_grad_norm: float = THESIS.max_grad_norm,
) -> StepLog:
    """One optimizer step per entry of ``plan`` (its micro-batches accumulated); the first ``warmup`` untimed.

    ``loss_fn(batch, num_items)`` returns the micro-batch's loss normalised over ``num_items``, the label tokens
    of the whole step (so the accumulated gradient is the step's mean, as the trainer computes it).
    ``step_hook(step)`` runs before each step and once after the last (profilers hook in there).
    """
    cuda = torch.device(device).type == "cuda"
    log = StepLog(warmup=warmup)
    for step, micro in enumerate(plan):
        if step_hook is not None:
            step_hook(step)
        num_items = sum(b.label_tokens for b in micro)
        micro = [b.to(device) for b in micro]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for batch in micro:
            loss = loss_fn(batch, num_items)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        log.grad_bytes = tensor_bytes(p.grad for p in params)
        clip_and_step(params, optimizer, scaler, max_grad_norm)
        if scheduler:
            scheduler.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        log.losses.append(round(float(step_loss), 5))
        log.tokens.append(sum(b.tokens for b in micro))
        log.label_tokens.append(num_items)
        if step >= warmup:
            log.seconds.append(elapsed)
    if step_hook is not None:
        step_hook(len(plan))
    return log
