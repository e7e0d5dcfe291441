"""LoRA dropout inside the LoRA GEMMs (``utils.speed.kernels``): CUDA only (Triton).

The three masked kernels equal PyTorch's maths on the same mask; the mask is Bernoulli with the rounded probability
in every bit lane and replays from the generator's state; a fused projection's gradients are those of the masked
maths; and a checkpointed layer's recomputation draws the same masks as its forward pass, whatever it keeps.
"""

from __future__ import annotations

import math

import pytest
import torch

from utils.speed.fastpath import FastPathOptions, disable_fast_path, enable_fast_path

from tests.test_fastpath import _batch, _fast_loss, _grads, _tiny_peft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture()
def kernels():
    pytest.importorskip("triton")
    from utils.speed import kernels

    return kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(300, 64, 12), (257, 3072, 96), (64, 200, 32), (1000, 576, 8)],
                         ids=["tiny", "llama-qkv", "ragged-features", "rank-8"])
def test_masked_lora_gemms_equal_pytorch_on_the_same_mask(kernels, shape, dtype):
    tokens, features, rank = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, features, device="cuda", generator=gen).to(dtype)
    a = (torch.randn(rank, features, device="cuda", generator=gen) / math.sqrt(features)).to(dtype)
    g = torch.randn(tokens, rank, device="cuda", generator=gen).to(dtype)
    drop = kernels.DropMask(tokens, features, 0.3, torch.device("cuda"))
    keep = drop.keep()
    xm = torch.where(keep, x.float(), 0.0)
    expected = {"down": xm @ a.float().t() * drop.scale,
                "up": torch.where(keep, g.float() @ a.float(), 0.0) * drop.scale,
                "grad_a": g.float().t() @ xm * drop.scale}
    got = {"down": kernels.lora_down(x, a, drop), "up": kernels.lora_up(g, a, drop),
           "grad_a": kernels.lora_grad_a(g, x, drop)}
    for name, value in got.items():
        assert value.dtype == dtype and value.shape == expected[name].shape, name
        error = (value.float() - expected[name]).abs().max() / expected[name].abs().max()
        assert error.item() < TOLERANCE[dtype], (name, error.item())


def test_mask_is_bernoulli_with_the_rounded_probability_and_replays(kernels):
    device = torch.device("cuda")
    torch.manual_seed(0)
    state = torch.cuda.get_rng_state()
    tokens, features = 4096, 512
    first = kernels.DropMask(tokens, features, 0.05, device)
    q = kernels.dropout_threshold(0.05) / kernels.DROP_LEVELS
    assert q == pytest.approx(0.05, abs=1 / kernels.DROP_LEVELS) and first.scale == pytest.approx(1 / (1 - q))
    dropped = ~first.keep()
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    # each of the 8 elements one Philox draw decides (its 16-bit lanes) is dropped at the same rate: no stuck lane
    lanes = dropped.view(tokens, features // 8, 8).float().mean((0, 1))
    assert (lanes - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / (n / 8))
    assert not torch.equal(kernels.DropMask(tokens, features, 0.05, device).bits, first.bits)  # a new seed
    torch.cuda.set_rng_state(state)
    assert torch.equal(kernels.DropMask(tokens, features, 0.05, device).bits, first.bits)  # the generator replays it
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match="0 < p < 1"):
            kernels.dropout_threshold(p)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.DropMask(4, 60, 0.1, device)
    assert kernels.fused_dropout_supported(3072, 96) and kernels.fused_dropout_supported(576, 8)
    assert not kernels.fused_dropout_supported(60, 12) and not kernels.fused_dropout_supported(64, 300)


class _Frozen:
    """The part of a ``FusedProjection`` that ``_LoraLinear`` reads: the frozen weight and the output width."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.out_features = weight, weight.shape[0]

    def frozen_weight(self) -> torch.Tensor:
        return self.weight


@pytest.mark.parametrize("base", ["mm", "skip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_projection_with_the_mask_has_the_gradients_of_the_masked_maths(kernels, base, dtype):
    """``x W^T + alpha (((x ⊙ keep) s) A^T) B^T``: output (unless skipped) and the gradients of x, A and B."""
    from utils.speed.fastpath.layers import _LoraLinear

    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens, features, out, rank, alpha = 200, 128, 96, 16, 2.0
    weight = (torch.randn(out, features, device="cuda", generator=gen) / 12).to(dtype)
    leaves = [torch.randn(tokens, features, device="cuda", generator=gen).to(dtype),
              (torch.randn(rank, features, device="cuda", generator=gen) / 12).to(dtype),
              (torch.randn(out, rank, device="cuda", generator=gen) / 4).to(dtype)]
    upstream = torch.randn(tokens, out, device="cuda", generator=gen).to(dtype)
    drop = kernels.DropMask(tokens, features, 0.25, torch.device("cuda"))
    keep = drop.keep()
    results = []
    for fused in (True, False):
        x, a, b = (t.clone().requires_grad_(True) for t in leaves)
        if fused:
            y = _LoraLinear.apply(x, None, a, b, _Frozen(weight), alpha, base, drop)
        else:
            y = x @ weight.t() + alpha * ((x * keep * drop.scale) @ a.t()) @ b.t()
        y.backward(upstream)
        results.append([y.detach().float(), x.grad.float(), a.grad.float(), b.grad.float()])
    for name, got, expected in zip(("output", "x", "A", "B"), *results):
        if name == "output" and base == "skip":
            continue  # a skipped recomputation's output is never read
        error = (got - expected).abs().max() / expected.abs().max()
        assert error.item() < 4 * TOLERANCE[dtype], (name, error.item())


@pytest.mark.parametrize("options", [FastPathOptions(checkpoint=False), FastPathOptions(checkpoint_keep="mid"),
                                     FastPathOptions(checkpoint_keep="mid+qkv"),
                                     FastPathOptions(checkpoint_keep="input", mlp_chunk_tokens=16),
                                     FastPathOptions(checkpoint_keep="mid+qkv", offload_checkpoints=False)],
                         ids=["no-checkpoint", "keep-mid", "keep-mid-qkv", "input-mlp-in-chunks", "on-gpu"])
def test_checkpoints_replay_the_fused_dropout_masks(kernels, monkeypatch, options):
    """The fast path with the Triton kernels and dropout 0.3: each variant's LoRA gradients equal those of the
    default recomputation (keep the layer input, offloaded) with the same MLP chunks, and masks were drawn."""
    from dataclasses import replace

    pytest.importorskip("liger_kernel")
    drawn = []
    original = kernels.DropMask
    monkeypatch.setattr(kernels, "DropMask", lambda *args: drawn.append(args) or original(*args))
    model = _tiny_peft(dropout=0.3).cuda()
    ids, mask, labels = (t.cuda() for t in _batch())
    liger = dict(kernels="liger", small_pass_tokens=0)
    reference = FastPathOptions(checkpoint_keep="input", mlp_chunk_tokens=options.mlp_chunk_tokens, **liger)
    results = []
    for opts in (reference, replace(options, **liger)):
        fast = enable_fast_path(model, torch.float32, opts)
        assert fast.describe()["fused_dropout"] is True
        model.zero_grad()
        torch.manual_seed(5)
        _fast_loss(model, ids, mask, labels).backward()
        results.append(_grads(model))
        disable_fast_path(model)
    assert drawn, "no LoRA-dropout mask was drawn for the Triton kernels"
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-5), name
