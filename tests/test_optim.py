"""The flat optimizer: the same update as bitsandbytes' per-tensor paged AdamW 8-bit, in one call."""

import pytest
import torch

from utils.speed.optim import FlatOptimizer, build_flat_paged_adamw_8bit, flat_unsupported_reason

bnb = pytest.importorskip("bitsandbytes")


def lora_like(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 512), (512, 8), (8, 768), (1024, 8)]  # multiples of 256 values, like LoRA A/B matrices
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes]


def run(params, optimizer, steps: int = 5, clip: float = 0.5) -> None:
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            # a zero gradient for the last tensor in step 2 (what the flat optimizer makes of a missing one)
            p.grad = torch.zeros_like(p) if (step == 2 and i == len(params) - 1) else torch.randn(p.shape, generator=g)
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad()


def test_flat_update_equals_per_tensor_update():
    reference, flat = lora_like(0), lora_like(0)
    groups = [{"params": flat[:3], "weight_decay": 0.01}, {"params": flat[3:], "weight_decay": 0.0}, {"params": []}]
    ref_groups = [{"params": reference[:3], "weight_decay": 0.01}, {"params": reference[3:], "weight_decay": 0.0}]
    run(reference, bnb.optim.PagedAdamW8bit(ref_groups, lr=1e-2))
    optimizer = build_flat_paged_adamw_8bit(groups, lr=1e-2)
    run(flat, optimizer)
    for a, b in zip(reference, flat):
        assert torch.equal(a, b)
        assert a.shape == b.shape
    assert len(optimizer.flats) == 2  # the empty group has no buffer


def test_state_dict_round_trip_and_layout_check():
    params = lora_like(0)
    optimizer = build_flat_paged_adamw_8bit(params, lr=1e-2)
    run(params, optimizer, steps=2)
    saved = optimizer.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build_flat_paged_adamw_8bit(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved)
    run(params, optimizer, steps=2)
    run(resumed_params, resumed, steps=2)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    other = build_flat_paged_adamw_8bit(lora_like(0)[:2], lr=1e-2)
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict(saved)


def test_refuses_sizes_that_would_change_the_state_blocks_and_moved_parameters():
    for shape in [(3, 2000), (8, 256)]:  # not whole blocks; under min_8bit_size (32-bit states per tensor)
        assert flat_unsupported_reason([torch.nn.Parameter(torch.zeros(shape))]) is not None
        with pytest.raises(ValueError, match="multiple of 256"):
            build_flat_paged_adamw_8bit([torch.nn.Parameter(torch.zeros(shape))], lr=1e-3)
    assert flat_unsupported_reason(lora_like(0)) is None
    params = lora_like(0)
    optimizer = FlatOptimizer(params, bnb.optim.PagedAdamW8bit, lr=1e-3)
    params[0].data = params[0].data.clone()
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="no longer lives"):
        optimizer.step()
