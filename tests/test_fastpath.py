"""The fast path computes what transformers + PEFT compute: same loss, same LoRA gradients, on CPU."""

from __future__ import annotations

import pytest
import torch

from utils.speed.fastpath import (
    FastPathError,
    FastPathOptions,
    causal_lm_loss,
    disable_fast_path,
    enable_fast_path,
    find_segments,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_peft(dropout: float = 0.0, targets=TARGETS, seed: int = 0, **lora_options):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                target_modules=list(targets), task_type="CAUSAL_LM",
                                                                **lora_options))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; non-zero B makes every LoRA term count in the check
            torch.nn.init.normal_(param, std=0.05)
    model.train()
    return model


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 20), generator=gen)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 8:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fast_loss(model, ids, mask, labels, **kw):
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    return causal_lm_loss(model, hidden, labels)


def _assert_fast_path_matches_peft(model, options: FastPathOptions | None = None):
    """PEFT's loss and LoRA gradients, then the fast path's on the same batch: equal within fp32 noise."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in _batch())
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()
    enable_fast_path(model, torch.float32, options)
    loss = _fast_loss(model, ids, mask, labels)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for name, grad in _grads(model).items():
        scale = expected[name].abs().max().item() + 1e-12
        assert (grad - expected[name]).abs().max().item() / scale < 1e-4, name


@pytest.mark.parametrize("options", [FastPathOptions(), FastPathOptions(checkpoint_keep="mid"),
                                     FastPathOptions(checkpoint_keep="mid+qkv"), FastPathOptions(checkpoint=False),
                                     FastPathOptions(mlp_chunk_tokens=16)],
                         ids=["recompute", "recompute-mid", "recompute-mid-qkv", "no-checkpoint", "mlp-in-chunks"])
@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj", "down_proj"], ["gate_proj", "up_proj", "down_proj"]],
                         ids=["all-seven", "q-v-down", "mlp-only"])
@pytest.mark.parametrize("dropout", [0.0, 1e-9], ids=["no-dropout", "dropout-path"])  # 1e-9: never drops
def test_fast_path_matches_peft_loss_and_lora_gradients(targets, options, dropout):
    _assert_fast_path_matches_peft(_tiny_peft(dropout=dropout, targets=targets), options)


def test_fused_modules_with_their_own_rank_and_scaling_match_peft():
    """q/k/v (and gate/up) fused into one GEMM still apply each module's own LoRA rank and scaling."""
    _assert_fast_path_matches_peft(_tiny_peft(rank_pattern={"k_proj": 2, "up_proj": 6},
                                              alpha_pattern={"k_proj": 16, "gate_proj": 2}))


def test_one_padding_free_row_equals_the_padded_batch():
    model = _tiny_peft()
    ids, mask, labels = _batch()
    enable_fast_path(model, torch.float32)
    padded = _fast_loss(model, ids, mask, labels)
    lengths = mask.sum(1).tolist()
    flat = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    flat_labels = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])[None].clone()
    flat_labels[positions == 0] = -100  # a sequence's first token is not predicted from the previous sequence
    packed = _fast_loss(model, flat, None, flat_labels, position_ids=positions)
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)


@pytest.mark.parametrize("options", [FastPathOptions(checkpoint=False), FastPathOptions(skip_down_recompute=False),
                                     FastPathOptions(checkpoint_keep="mid"), FastPathOptions(checkpoint_keep="mid+qkv"),
                                     FastPathOptions(checkpoint=False, mlp_chunk_tokens=16),
                                     FastPathOptions(checkpoint_keep="input", mlp_chunk_tokens=16),
                                     FastPathOptions(checkpoint_keep="mid+qkv", mlp_chunk_tokens=16),
                                     FastPathOptions(checkpoint_keep="mid", keep_layers=1),
                                     FastPathOptions(checkpoint_keep="mid+qkv", keep_layers=2)],
                         ids=["no-checkpoint", "recompute-down", "keep-mid", "keep-mid-qkv", "no-checkpoint-mlp-in-chunks",
                              "input-mlp-in-chunks", "keep-mid-qkv-mlp-in-chunks", "keep-mid-first-layer",
                              "keep-mid-qkv-first-two-layers"])
def test_checkpoints_replay_the_same_dropout_and_skip_down_changes_nothing(options):
    """Recomputation must draw the same LoRA-dropout masks, and skipping frozen GEMMs must not change grads.

    The reference is the default recomputation with the same MLP chunks (each chunk draws its own masks).
    """
    _assert_same_dropout_grads(_tiny_peft(dropout=0.3), FastPathOptions(mlp_chunk_tokens=options.mlp_chunk_tokens),
                               options, atol=1e-6)


def _assert_same_dropout_grads(model, reference: FastPathOptions, options: FastPathOptions, atol: float) -> None:
    """The LoRA gradients of one step from the same seed under two fast-path settings: equal within ``atol``."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in _batch())
    results = []
    for opts in (reference, options):
        enable_fast_path(model, torch.float32, opts)
        model.zero_grad()
        torch.manual_seed(5)
        _fast_loss(model, ids, mask, labels).backward()
        results.append(_grads(model))
        disable_fast_path(model)
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=atol), name


def test_dropout_is_on_in_training_and_off_in_eval():
    model = _tiny_peft(dropout=0.5)
    ids, mask, labels = _batch()
    enable_fast_path(model, torch.float32)
    with torch.no_grad():
        torch.manual_seed(1)
        a = _fast_loss(model, ids, mask, labels).item()
        torch.manual_seed(2)
        b = _fast_loss(model, ids, mask, labels).item()
        model.eval()
        c, d = (_fast_loss(model, ids, mask, labels).item() for _ in range(2))
    assert a != b and c == d


def test_generation_keeps_the_original_forward_and_disable_restores_it():
    model = _tiny_peft()
    model.eval()
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        before = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        enable_fast_path(model, torch.float32)
        during = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        disable_fast_path(model)
        after = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not hasattr(model.get_base_model().model, "_fast_path")


def test_segments_start_at_position_zero_and_at_row_starts():
    positions = torch.tensor([0, 1, 2, 0, 1, 5, 6, 0])
    rows = torch.zeros(8, dtype=torch.bool)
    rows[5] = True  # a row that starts mid-document (positions 5, 6)
    seg = find_segments(positions, rows)
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 7, 8]
    assert seg.max_len == 3 and seg.count == 4
    assert seg.index.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert seg.position.tolist() == [0, 1, 2, 0, 1, 0, 1, 0]


def test_unsupported_models_and_settings_fail_with_one_clear_message():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(FastPathError, match="cannot find the decoder layers"):
        enable_fast_path(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(FastPathError, match="kernels="):
        FastPathOptions(kernels="cuda")
    with pytest.raises(FastPathError, match="checkpoint_keep="):
        FastPathOptions(checkpoint_keep="everything")
    with pytest.raises(FastPathError, match="mlp_chunk_tokens="):
        FastPathOptions(mlp_chunk_tokens=-8)
    for bad in (-1, 2.5, True):
        with pytest.raises(FastPathError, match=r"keep_layers=.*whole number of layers"):
            FastPathOptions(checkpoint_keep="mid", keep_layers=bad)
    for keep in ("input", "auto"):
        with pytest.raises(FastPathError, match=f"checkpoint_keep='{keep}'.*'mid' or 'mid\\+qkv'"):
            FastPathOptions(checkpoint_keep=keep, keep_layers=4)
    with pytest.raises(FastPathError, match="exact_pinned="):
        FastPathOptions(exact_pinned="yes")
    unfrozen = _tiny_peft()
    unfrozen.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.requires_grad_(True)
    with pytest.raises(FastPathError, match="layers.0.mlp.down_proj.*trainable"):
        enable_fast_path(unfrozen, torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(FastPathError, match="needs a CUDA GPU"):
            enable_fast_path(_tiny_peft(), torch.float32, FastPathOptions(kernels="liger"))


def test_page_locked_buffers_register_their_exact_bytes_and_unregister_when_freed(monkeypatch):
    """``page_locked_empty`` asks CUDA to page-lock exactly the tensor's bytes, unpins them when the tensor is freed,
    and turns a refusal into one message naming the size and the way out (CUDA's runtime faked: runs on a CPU)."""
    import gc

    from utils.speed.fastpath import checkpoint

    calls = []

    class FakeCudart:
        error = 0

        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size, flags))
            return self.error

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    buf = checkpoint.page_locked_empty(30_000, torch.float16)
    assert buf.shape == (30_000,) and buf.dtype == torch.float16
    assert calls == [("register", buf.data_ptr(), 60_000, 0)]
    ptr = buf.data_ptr()
    del buf
    gc.collect()
    assert calls[-1] == ("unregister", ptr)
    assert checkpoint.page_locked_empty(0, torch.float16).numel() == 0 and len(calls) == 2  # nothing to lock
    fake.error = 2
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of 95 MiB failed \(CUDA error 2\).*exact_pinned=False"):
        checkpoint.page_locked_empty(50_000_000, torch.float16)


@pytest.mark.parametrize("keep, first, mids, qkvs", [
    ("mid", None, [True, True, True], [False, False, False]),
    ("mid", 1, [True, False, False], [False, False, False]),
    ("mid+qkv", 2, [True, True, False], [True, True, False]),
    ("mid+qkv", 0, [False, False, False], [False, False, False]),
    ("input", None, [False, False, False], [False, False, False]),
])
def test_keep_layers_gives_only_the_first_layers_the_extra_checkpoints(keep, first, mids, qkvs):
    model = _tiny_peft(dropout=0.1)
    enable_fast_path(model, torch.float32, FastPathOptions(checkpoint_keep=keep, keep_layers=first))
    fast = model.get_base_model().model._fast_path
    plans = fast.recompute_plans(training=True)
    assert [p.mid for p in plans] == mids and [p.qkv for p in plans] == qkvs
    assert all(p.rng and p.last == 2 for p in plans) and not any(p.rng for p in fast.recompute_plans(False))
    assert fast.describe()["keep_layers"] == first and fast.describe()["exact_pinned"] is False


def test_auto_kernels_use_pytorch_ops_for_small_passes(monkeypatch):
    """Under kernels="auto", passes below ``small_pass_tokens`` run PyTorch's ops, larger ones the resolved set."""
    from utils.speed.fastpath import backbone, ops

    calls = []
    torch_set = ops.KERNELS["torch"]
    recording = ops._Kernels(
        "recording", lambda *a: calls.append("rms_norm") or torch_set.rms_norm(*a),
        lambda *a: calls.append("rope") or torch_set.rope_qkv(*a), lambda *a: calls.append("swiglu") or torch_set.swiglu(*a))
    monkeypatch.setattr(backbone, "resolve_kernels", lambda choice, device: recording)
    ids, mask, labels = _batch()
    tokens = int(mask.sum())
    losses = []
    for threshold, large in ((tokens + 1, False), (tokens, True)):
        model = _tiny_peft()
        fast = enable_fast_path(model, torch.float32, FastPathOptions(small_pass_tokens=threshold,
                                                                      checkpoint=False))
        calls.clear()
        losses.append(_fast_loss(model, ids, mask, labels).item())
        # a large pass: 3 layers x (2 norms, RoPE, SwiGLU) and the final norm through the resolved set
        assert len(calls) == (3 * 4 + 1 if large else 0), (threshold, calls)
        assert "torch below" in fast.describe()["kernels"]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    with pytest.raises(FastPathError, match="small_pass_tokens"):
        FastPathOptions(small_pass_tokens=-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the direct kernel calls need a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "nf4"])
def test_direct_dequantisation_equals_bitsandbytes(nested, dtype, device):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from utils.speed.fastpath.layers import _bnb_kernels, dequantize_4bit_into

    weight = torch.randn(96, 128, dtype=dtype, device=device)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state)
    out = torch.empty(2, 96, 128, dtype=dtype, device=device)[1]  # not at the start of its buffer
    assert torch.equal(dequantize_4bit_into(packed, state, out), expected)
    assert (expected - weight).abs().mean() < 0.1  # it is a 4-bit copy of the weight, not zeros
    if device == "cuda":  # the kernels were called through ctypes, not through bitsandbytes' dispatcher
        assert _bnb_kernels(out) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's kernels need a CUDA GPU")
def test_flash_varlen_matches_sdpa_forward_and_backward_on_gpu():
    from utils.speed.fastpath import attention_sdpa, attention_varlen

    torch.manual_seed(0)
    seg = find_segments(torch.cat([torch.arange(n) for n in (7, 130, 64)]).cuda())
    q, k, v = (torch.randn(201, heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (8, 2, 2))
    results = []
    for attention in (attention_varlen, attention_sdpa):
        out = attention(q, k, v, seg)
        out.backward(torch.ones_like(out))
        results.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for fast, reference in zip(*results):
        assert (fast - reference).abs().max().item() < 3e-2


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("options", [FastPathOptions(kernels="liger", small_pass_tokens=0),
                                     FastPathOptions(kernels="liger", small_pass_tokens=0, mlp_chunk_tokens=16),
                                     FastPathOptions(kernels="liger", small_pass_tokens=0, checkpoint_keep="mid",
                                                     keep_layers=1, exact_pinned=True)],
                         ids=["triton-kernels", "triton-kernels-mlp-in-chunks", "keep-mid-first-layer-exact-pinned"])
def test_fast_path_on_gpu_matches_peft(options):
    """On CUDA: Liger's and this project's Triton kernels, checkpoints offloaded through pinned memory."""
    pytest.importorskip("liger_kernel")
    model = _tiny_peft().cuda()
    _assert_fast_path_matches_peft(model, options)
    assert model.get_base_model().model._fast_path.describe()["offload_checkpoints"]


@CUDA
def test_exact_pinned_checkpoints_are_page_locked_at_their_size_and_come_back_equal():
    """exact_pinned: the buffer is page-locked (asynchronous copies) and exactly as large as the checkpoint, where
    PyTorch's pinned allocator would round 3 × 10,000 fp16 values (60,000 bytes) up to 65,536; a larger checkpoint
    under the same key gets a new buffer; loaded directly or through a prefetch, the tensor comes back equal."""
    from utils.speed.fastpath import CheckpointStore

    store = CheckpointStore(True, torch.device("cuda"), exact_pinned=True)
    x = torch.randn(3, 10_000, device="cuda", dtype=torch.float16)
    handle = store.save((0, 0), x)
    store.mark(0)
    buf = store.buffers[(0, 0)]
    assert buf.is_pinned() and buf.untyped_storage().nbytes() == x.numel() * x.element_size() == 60_000
    assert torch.equal(store.load(handle), x)
    y = torch.randn(4, 10_000, device="cuda", dtype=torch.float16)
    handle = store.save((0, 0), y)
    store.prefetch((0, 0))
    assert store.buffers[(0, 0)].untyped_storage().nbytes() == 80_000 and torch.equal(store.load(handle), y)
    torch.cuda.synchronize()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_rope_kernel_on_the_fused_projection_equals_pytorch(dtype):
    pytest.importorskip("triton")
    from utils.speed.fastpath.ops import _rope_qkv_torch, _rope_qkv_triton

    torch.manual_seed(0)
    tokens, heads, kv_heads, head_dim = 300, 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    angles = torch.rand(tokens, head_dim // 2, device="cuda") * 6.0
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    outputs, grads = [], []
    for rope in (_rope_qkv_torch, _rope_qkv_triton):
        x = qkv.clone().requires_grad_(True)
        q, k, v = rope(x, cos, sin, heads, kv_heads, head_dim)
        assert q.shape == (tokens, heads, head_dim) and k.shape == v.shape == (tokens, kv_heads, head_dim)
        gen = torch.Generator(device="cuda").manual_seed(1)
        upstream = [torch.randn(t.shape, device="cuda", dtype=dtype, generator=gen) for t in (q, k, v)]
        # a strided gradient, as FlashAttention's backward may hand back
        upstream[1] = upstream[1].transpose(0, 1).contiguous().transpose(0, 1)
        torch.autograd.backward((q, k, v), upstream)
        outputs.append(torch.cat([t.reshape(tokens, -1) for t in (q, k, v)], 1).float())
        grads.append(x.grad.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert (outputs[0] - outputs[1]).abs().max().item() < tol * 8
    assert (grads[0] - grads[1]).abs().max().item() < tol * 8
    assert torch.equal(outputs[0][:, -kv_heads * head_dim:], outputs[1][:, -kv_heads * head_dim:])  # v: a copy


@CUDA
def test_fast_path_on_gpu_matches_peft_through_the_fused_dropout_kernels():
    """The Triton dropout pass (p = 1e-9 rounds to 0: it runs and drops nothing) and the LoRA update inside the
    q/k/v and gate/up GEMMs give PEFT's loss and gradients."""
    pytest.importorskip("liger_kernel")
    model = _tiny_peft(dropout=1e-9).cuda()
    _assert_fast_path_matches_peft(model, FastPathOptions(kernels="liger", small_pass_tokens=0))
    assert model.get_base_model().model._fast_path.describe()["fused_lora"]


@CUDA
@pytest.mark.parametrize("options", [FastPathOptions(kernels="liger", small_pass_tokens=0, checkpoint=False),
                                     FastPathOptions(kernels="liger", small_pass_tokens=0, checkpoint_keep="mid+qkv"),
                                     FastPathOptions(kernels="liger", small_pass_tokens=0, skip_down_recompute=False),
                                     FastPathOptions(kernels="liger", small_pass_tokens=0, checkpoint_keep="mid+qkv",
                                                     keep_layers=1, exact_pinned=True)],
                         ids=["no-checkpoint", "keep-mid-qkv", "recompute-down", "keep-mid-qkv-first-layer-exact-pinned"])
def test_recomputation_replays_the_fused_dropout_masks_on_gpu(options):
    """Dropout 0.3 through the Triton kernels: each checkpointed layer's recomputation draws the forward's masks."""
    pytest.importorskip("liger_kernel")
    _assert_same_dropout_grads(_tiny_peft(dropout=0.3).cuda(), FastPathOptions(kernels="liger", small_pass_tokens=0),
                               options, atol=1e-5)


@CUDA
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("concat", [True, False], ids=["lora-in-the-gemm", "lora-as-beta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_lora_projection_computes_its_pytorch_maths_on_gpu(monkeypatch, p, concat, dtype):
    """_FusedLoraLinear against x·Wᵀ + alpha·((x ⊙ keep · s)·Aᵀ)·Bᵀ in fp32 with the kernel's own mask: output and
    the gradients of x, A and B; a skipped forward ("skip") gives the same gradients."""
    pytest.importorskip("triton")
    from utils.speed import kernels
    from utils.speed.fastpath.layers import FusedProjection, _FusedLoraLinear

    made = []

    class Recording(kernels.LoraDropout):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(kernels, "LoraDropout", Recording)
    torch.manual_seed(0)
    tokens, features, outs, rank, alpha = 200, 64, (96, 32), 8, 2.0
    modules = [torch.nn.Linear(features, n, bias=False).cuda().requires_grad_(False) for n in outs]
    projection = FusedProjection(modules, dtype, "test")
    x0 = torch.randn(tokens, features, device="cuda", dtype=dtype)
    a0 = torch.randn(rank, features, device="cuda", dtype=dtype) / 8
    b0 = torch.randn(sum(outs), rank, device="cuda", dtype=dtype) / 8
    upstream = torch.randn(tokens, sum(outs), device="cuda", dtype=dtype)
    runs = []
    for base in ("mm", "skip"):
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        torch.manual_seed(7)
        y = _FusedLoraLinear.apply(x, a, b, projection, alpha, base, p, concat)
        y.backward(upstream)
        runs.append((y.detach(), x.grad, a.grad, b.grad))
    assert len(made) == (2 if p else 0)
    keep = made[0].keep() if p else torch.ones_like(x0, dtype=torch.bool)
    scale = made[0].scale if p else 1.0
    if p:
        assert torch.equal(made[0].keep(), made[1].keep())  # the same seed: the same mask
        assert 0.2 < 1 - keep.float().mean().item() < 0.4
    weight = torch.cat([m.weight for m in modules]).float()
    x, a, b = (t.float().requires_grad_(True) for t in (x0, a0, b0))
    y = x @ weight.t() + alpha * ((x * keep * scale) @ a.t()) @ b.t()
    y.backward(upstream.float())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in zip(runs[0], (y.detach(), x.grad, a.grad, b.grad)):
        assert (got.float() - want).abs().max().item() <= tol * (want.abs().max().item() + 1)
    for mm, skip in zip(runs[0][1:], runs[1][1:]):
        assert torch.allclose(mm.float(), skip.float(), atol=tol)


@CUDA
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single-quant"])
def test_frozen_weight_with_lora_dequantises_into_strided_rows_as_bitsandbytes_on_gpu(quant_type, nested):
    """[W | alpha·B] from the strided Triton dequantisation equals bitsandbytes' W, bit for bit, beside alpha·B."""
    pytest.importorskip("triton")
    import bitsandbytes as bnb

    from utils.speed.fastpath.layers import FusedProjection

    torch.manual_seed(0)
    modules = [bnb.nn.Linear4bit(64, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested,
                                 quant_type=quant_type).cuda() for n in (96, 32)]
    for module in modules:
        module.weight.requires_grad_(False)
    projection = FusedProjection(modules, torch.bfloat16, "test")
    assert all(state is not None for state in projection.quant_states)
    b = torch.randn(128, 8, device="cuda", dtype=torch.bfloat16)
    wide = projection.frozen_weight_with_lora(b, 2.0)
    assert torch.equal(wide, torch.cat([projection.frozen_weight(), 2.0 * b], 1))


@CUDA
@pytest.mark.parametrize("lengths", [(128, 128, 128), (7, 130, 64)], ids=["rows-of-one-length", "packed-rows"])
def test_cudnn_attention_matches_flash_varlen_forward_and_backward_on_gpu(lengths):
    """attention="cudnn": rows of one length through SDPA's cuDNN kernel (grouped k/v heads as they are), packed rows
    of different lengths through FlashAttention's variable-length kernel: the same outputs and gradients."""
    from utils.speed.fastpath.attention import _CUDNN, attention_cudnn, attention_varlen, cudnn_supported

    if not cudnn_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no cuDNN attention on this GPU / PyTorch")
    torch.manual_seed(0)
    seg = find_segments(torch.cat([torch.arange(n) for n in lengths]).cuda())
    q, k, v = (torch.randn(sum(lengths), heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (24, 8, 8))
    upstream = torch.randn(sum(lengths), 24, 128, device="cuda", dtype=torch.bfloat16)
    results = []
    for attention in (attention_varlen, attention_cudnn):
        out = attention(q, k, v, seg)
        out.backward(upstream)
        results.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert "failed" not in _CUDNN, _CUDNN.get("failed")
    assert results[1][0].shape == (sum(lengths), 24, 128)
    for cudnn, flash in zip(*results):
        assert (cudnn - flash).abs().max().item() < 3e-2 * (flash.abs().max().item() + 1)


def _bf16_steps_on_gpu(attentions: tuple[str, ...]) -> list[tuple]:
    """One bf16 step of the tiny model (rows of one length, the Liger kernels on every pass) per ``attention``
    setting: (the FastPath, its loss, its LoRA gradients) each. Skips where cuDNN attention or Liger cannot run."""
    pytest.importorskip("liger_kernel")
    from utils.speed.fastpath.attention import cudnn_supported

    if not cudnn_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no cuDNN attention on this GPU / PyTorch")
    model = _tiny_peft().cuda().to(torch.bfloat16)
    ids = _batch()[0].cuda()
    results = []
    for attention in attentions:
        enable_fast_path(model, torch.bfloat16, FastPathOptions(kernels="liger", small_pass_tokens=0,
                                                               attention=attention))
        fast = model.get_base_model().model._fast_path
        model.zero_grad()
        loss = _fast_loss(model, ids, None, ids)
        loss.backward()
        results.append((fast, loss.item(), _grads(model)))
        disable_fast_path(model)
    return results


def _assert_same_step(reference: tuple, other: tuple) -> None:
    """Two results of ``_bf16_steps_on_gpu``: losses within 0.02, each LoRA gradient within 10 % of its scale."""
    assert other[1] == pytest.approx(reference[1], abs=2e-2)
    for name, grad in reference[2].items():
        scale = grad.float().abs().max().item() + 1e-6
        assert (other[2][name].float() - grad.float()).abs().max().item() / scale < 0.1, name


@CUDA
def test_fast_path_with_cudnn_attention_trains_as_with_flash_varlen_on_gpu():
    """A bf16 step of the tiny model on rows of one length: the cuDNN and the FlashAttention fast paths agree."""
    varlen, cudnn = _bf16_steps_on_gpu(("varlen", "cudnn"))
    assert [r[0].describe()["attention"] for r in (varlen, cudnn)] == ["varlen", "cudnn"]
    _assert_same_step(varlen, cudnn)


def test_cudnn_attention_is_refused_where_it_cannot_run_with_the_way_out():
    with pytest.raises(FastPathError, match="attention='cudnn'.*attention='auto'"):
        enable_fast_path(_tiny_peft(), torch.float32, FastPathOptions(attention="cudnn"))


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["plain", "cuda-graphs"])
def test_auto_attention_takes_cudnn_for_large_passes_only(monkeypatch, cuda_graphs):
    """attention="auto" where FlashAttention and cuDNN both run: cuDNN's kernel for passes of ``small_pass_tokens``
    or more, the layers' FlashAttention kernel for smaller ones, and never under CUDA graphs. The kernels are replaced
    by recording wrappers around SDPA so the choice runs on the CPU."""
    from utils.speed.fastpath import attention as attention_module
    from utils.speed.fastpath import backbone as backbone_module

    calls = []

    def recording(name):
        def kernel(q, k, v, seg):
            calls.append((name, q.shape[0]))
            return attention_module.attention_sdpa(q, k, v, seg)
        return kernel

    monkeypatch.setattr(backbone_module, "varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(backbone_module, "cudnn_supported", lambda device, dtype: True)
    monkeypatch.setitem(attention_module.ATTENTION_KERNELS, "varlen", recording("varlen"))
    monkeypatch.setitem(attention_module.ATTENTION_KERNELS, "cudnn", recording("cudnn"))
    model = _tiny_peft()
    ids, _, _ = _batch()  # 3 rows x 20 tokens: 60 tokens per pass
    enable_fast_path(model, torch.float32, FastPathOptions(small_pass_tokens=60, offload_checkpoints=False,
                                                           cuda_graphs=cuda_graphs))
    fast = model.get_base_model().model._fast_path
    _fast_loss(model, ids, None, ids).backward()  # a large pass (60 tokens)
    _fast_loss(model, ids[:2], None, ids[:2]).backward()  # a small one (40 tokens)
    disable_fast_path(model)
    large = "varlen" if cuda_graphs else "cudnn"
    assert fast.large_attention == large
    assert ("cudnn" in fast.describe()["attention"]) is not cuda_graphs
    # each pass runs attention once per layer forward and once per recomputation (3 layers, checkpointed)
    assert {name for name, tokens in calls if tokens == 60} == {large}
    assert {name for name, tokens in calls if tokens == 40} == {"varlen"}


def test_explicit_attention_choices_hold_for_every_pass(monkeypatch):
    """attention="varlen" is not promoted to cuDNN for large passes: only "auto" chooses per pass."""
    from utils.speed.fastpath import backbone as backbone_module

    monkeypatch.setattr(backbone_module, "varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(backbone_module, "cudnn_supported", lambda device, dtype: True)
    model = _tiny_peft()
    enable_fast_path(model, torch.float32, FastPathOptions(attention="varlen", small_pass_tokens=0))
    fast = model.get_base_model().model._fast_path
    assert (fast.attention, fast.large_attention, fast.describe()["attention"]) == ("varlen", "varlen", "varlen")
    disable_fast_path(model)


@CUDA
def test_auto_attention_runs_cudnn_on_a_large_pass_of_one_length_on_gpu():
    """On the GPU, "auto" picks cuDNN for a large pass of equal rows, and its step equals an explicit "varlen" one."""
    from utils.speed.fastpath.attention import _CUDNN

    varlen, auto = _bf16_steps_on_gpu(("varlen", "auto"))
    assert [r[0].large_attention for r in (varlen, auto)] == ["varlen", "cudnn"]
    assert "failed" not in _CUDNN, _CUDNN.get("failed")
    _assert_same_step(varlen, auto)
