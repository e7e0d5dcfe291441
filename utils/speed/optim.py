"""One optimizer update per parameter group: bitsandbytes' paged AdamW 8-bit over a flat buffer.

bitsandbytes' 8-bit optimizers update one tensor at a time and synchronise the GPU after each; the 392 LoRA
tensors of Llama-3.2-3B (r=32, seven modules) cost ~50 ms of a training step that way. ``FlatOptimizer``
makes every parameter of a group a view into one flat fp32 buffer and gives the per-tensor optimizer that
buffer instead, so a step is one kernel and one synchronisation. The update is the same number for number
when every tensor's size is a multiple of the optimizer's block (256 values: each block's scale covers the same
values as before) and at least the optimizer's ``min_8bit_size`` (4096: smaller tensors get 32-bit states), which
the LoRA matrices of the thesis models are; other sizes are refused (``flat_unsupported_reason`` says why beforehand).
"""

from __future__ import annotations

from typing import Any, Callable

import bitsandbytes as bnb
import torch

BLOCK = 256  # values per quantisation block of bitsandbytes' 8-bit optimizer states
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states


def flat_unsupported_reason(params, min_8bit_size: int = MIN_8BIT_SIZE) -> str | None:
    """Why ``FlatOptimizer`` would not give these parameters exactly the per-tensor 8-bit update (None: it would)."""
    params = list(params)
    if not params:
        return "no parameters"
    first = params[0]
    for p in params:
        if p.dtype != first.dtype or p.device != first.device:
            return (f"all parameters of a group need one dtype and device; found {first.dtype}/{first.device} and "
                    f"{p.dtype}/{p.device}")
        if p.numel() % BLOCK or p.numel() < min_8bit_size:
            return (f"a parameter of shape {tuple(p.shape)} is not a multiple of {BLOCK} values of at least "
                    f"{min_8bit_size}, so its optimizer state would change")
    return None


class FlatOptimizer(torch.optim.Optimizer):
    """Run ``inner_cls`` (e.g. ``bitsandbytes.optim.PagedAdamW8bit``) once per parameter group, over one buffer.

    The parameters keep their identity (gradient clipping, GradScaler, schedulers and DDP see them as before);
    their storage moves into the flat buffer. A parameter without a gradient in a step counts as a zero gradient.
    """

    def __init__(self, params, inner_cls: Callable[..., torch.optim.Optimizer], **kwargs: Any):
        super().__init__(params, dict(kwargs))
        self.flats: list[tuple[int, torch.nn.Parameter]] = []
        min_size = kwargs.get("min_8bit_size", MIN_8BIT_SIZE)
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                flat = self._flatten(group["params"], min_size)
                self.flats.append((index, torch.nn.Parameter(flat, requires_grad=False)))
        self.inner = inner_cls([{**self._hyper(index), "params": [flat]} for index, flat in self.flats], **kwargs)

    @staticmethod
    def _flatten(params: list[torch.Tensor], min_size: int) -> torch.Tensor:
        """Copy ``params`` into one buffer and make each of them a view into it."""
        reason = flat_unsupported_reason(params, min_size)
        if reason:
            raise ValueError(f"FlatOptimizer: {reason}; use the per-tensor optimizer (training setting "
                             "fast_path='off').")
        first = params[0]
        flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        offset = 0
        for p in params:
            view = flat[offset:offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            offset += p.numel()
        return flat

    def _hyper(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.param_groups[index].items() if k != "params"}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for (index, flat), inner_group in zip(self.flats, self.inner.param_groups):
            params = self.param_groups[index]["params"]
            inner_group.update(self._hyper(index))  # the learning-rate schedule writes the outer groups
            offset = 0
            for p in params:
                if p.data_ptr() != flat.data_ptr() + offset * flat.element_size():
                    raise RuntimeError("FlatOptimizer: a parameter no longer lives in the optimizer's buffer (was "
                                       "the model moved or reloaded after the optimizer was built?); build the "
                                       "optimizer again after moving the model.")
                offset += p.numel()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat.grad = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0].reshape(-1)
        self.inner.step()
        for _, flat in self.flats:
            flat.grad = None
        return loss

    def _layout(self) -> list[list[tuple[int, ...]]]:
        return [[tuple(p.shape) for p in self.param_groups[i]["params"]] for i, _ in self.flats]

    def state_dict(self) -> dict[str, Any]:
        return {"flat_layout": self._layout(),
                "param_groups": [self._hyper(i) for i in range(len(self.param_groups))],
                "inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("flat_layout")
        if saved is None or [[tuple(s) for s in g] for g in saved] != self._layout():
            raise ValueError("FlatOptimizer: the saved optimizer state was written for other parameters (or by "
                             "the per-tensor optimizer); resume with the same model, LoRA and fast_path setting.")
        for group, hyper in zip(self.param_groups, state_dict["param_groups"]):
            group.update(hyper)
        self.inner.load_state_dict(state_dict["inner"])


def build_flat_paged_adamw_8bit(params, **kwargs: Any) -> FlatOptimizer:
    """bitsandbytes' paged AdamW 8-bit (the thesis optimizer), one update per parameter group."""
    return FlatOptimizer(params, bnb.optim.PagedAdamW8bit, **kwargs)
