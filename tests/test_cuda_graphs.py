"""The CUDA-graph step of the fast path (utils.speed.graphs): bucketing, padding, options, benchmark rows; on a GPU,
the graphed step against the eager fast path."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from utils.speed.benchmark.configs import CONFIGS_BY_NAME, config_by_name
from utils.speed.benchmark.strict import RECIPE_PAIRS, RECIPE_ROWS, STRICT8_ROWS, strict_summary
from utils.speed.fastpath import FastPathError, FastPathOptions, causal_lm_loss, enable_fast_path
from utils.speed.graphs import (
    GraphedStep,
    bucket_length,
    bucket_lengths,
    flat_causal_loss,
    flatten_batch,
    graph_hidden,
)
from utils.train_step import Batch

from tests.test_benchmark import _strict_row
from tests.test_fastpath import _tiny_peft

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRAPHS = FastPathOptions(offload_checkpoints=False, cuda_graphs=True, graph_bucket_tokens=16)


@pytest.mark.parametrize("tokens, expected", [(1, 64), (64, 64), (65, 128), (500, 512), (1000, 1024), (1024, 1024)])
def test_a_micro_batch_is_padded_up_to_the_next_bucket(tokens, expected):
    assert bucket_length(tokens, 64, 1024) == expected


def test_the_last_bucket_is_the_largest_micro_batch_and_longer_ones_are_refused():
    assert bucket_length(990, 128, 1000) == 1000  # not 1024: no graph is longer than micro-batch x max length
    assert bucket_lengths(128, 1000) == [128, 256, 384, 512, 640, 768, 896, 1000]
    with pytest.raises(FastPathError, match="1001 tokens.*largest bucket"):
        bucket_length(1001, 128, 1000)


def _corpus_row(lengths: list[int], seed: int = 0) -> Batch:
    """Examples packed in one padding-free row, as ``workloads.one_row`` packs the corpus."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (sum(lengths),), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[3] = -100  # a prompt token
    return Batch(ids[None], labels[None], None, pos[None], ids.numel())


def test_padding_is_one_more_sequence_whose_labels_are_ignored():
    flat = flatten_batch(_corpus_row([5, 7]), bucket=16, max_tokens=32)
    assert flat.ids.numel() == 16 and flat.tokens == 12 and flat.key == (16, 3)
    assert flat.labels[12:].eq(-100).all() and flat.ids[12:].eq(0).all()
    assert flat.positions.tolist() == [*range(5), *range(7), *range(4)]
    assert flat.segments.cu_seqlens.tolist() == [0, 5, 12, 16]
    assert flat.labels[:12].ne(-100).sum() == _corpus_row([5, 7]).label_tokens


def test_rows_become_one_stream_and_no_row_predicts_the_next_rows_first_token():
    ids = torch.arange(1, 17).view(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    flat = flatten_batch(Batch(ids, ids.masked_fill(mask == 0, -100), mask), bucket=8, max_tokens=16)
    assert flat.key == (16, 3) and flat.tokens == 14
    assert flat.ids[:14].tolist() == [*range(1, 9), *range(9, 15)]
    assert flat.labels[8] == -100 and flat.labels[0] == -100  # each row's first token
    assert flat.segments.cu_seqlens.tolist() == [0, 8, 14, 16]
    full = flatten_batch(Batch(ids, ids.clone()), bucket=16, max_tokens=16)  # exactly one bucket: no padding
    assert full.key == (16, 2) and full.segments.cu_seqlens.tolist() == [0, 8, 16]


def test_the_fixed_shape_loss_equals_the_fast_paths_loss():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(1, 20, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (1, 20), generator=gen)
    labels[0, [0, 4, 5, 17]] = -100
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight.data = weight
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    expected = causal_lm_loss(model, hidden, labels, num_items=15)
    got = flat_causal_loss(weight, hidden[0], labels[0], torch.tensor(15.0), chunk=7)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def _two_rows() -> Batch:
    """Two full rows of random ids, labels = ids: the synthetic recipe's micro-batch."""
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    return Batch(ids, ids.clone(), tokens=ids.numel())


@pytest.mark.parametrize("make", [lambda: _corpus_row([9, 14]), _two_rows], ids=["packed-corpus-row", "two-rows"])
def test_padded_stream_gives_the_fast_paths_loss_and_lora_gradients_on_cpu(make):
    """``graph_hidden`` over a padded stream (what a graph replays) against the fast path's own forward."""
    model = _tiny_peft()
    enable_fast_path(model, torch.float32, FastPathOptions(offload_checkpoints=False))
    batch = make()
    backbone = model.get_base_model().model
    hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    expected_loss = causal_lm_loss(model, hidden, batch.labels, batch.label_tokens)
    expected_loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    flat = flatten_batch(batch, bucket=16, max_tokens=64)
    assert flat.key == (32, 3)
    out = graph_hidden(backbone._fast_path, backbone, flat.ids, flat.positions, flat.segments)
    loss = flat_causal_loss(model.get_output_embeddings().weight, out, flat.labels,
                             torch.tensor(float(batch.label_tokens)))
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    for name, p in params.items():
        scale = expected[name].abs().max().item() + 1e-12
        assert (p.grad - expected[name]).abs().max().item() / scale < 1e-4, name


def test_graph_options_are_off_by_default_and_errors_name_the_setting_and_the_fix():
    assert FastPathOptions().cuda_graphs is False
    with pytest.raises(FastPathError, match="offload_checkpoints=False"):
        FastPathOptions(cuda_graphs=True)
    with pytest.raises(FastPathError, match="graph_bucket_tokens=0"):
        FastPathOptions(graph_bucket_tokens=0)
    with pytest.raises(FastPathError, match="cuda_graphs='yes'"):
        FastPathOptions(cuda_graphs="yes", offload_checkpoints=False)


def test_the_graphed_step_refuses_a_cpu_and_a_model_without_graphs():
    model = _tiny_peft()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(FastPathError, match="no fast path"):
        GraphedStep(model, params)
    enable_fast_path(model, torch.float32, FastPathOptions(offload_checkpoints=False))
    with pytest.raises(FastPathError, match="set cuda_graphs=True"):
        GraphedStep(model, params)
    enable_fast_path(model, torch.float32, GRAPHS)
    with pytest.raises(FastPathError, match="needs a CUDA GPU.*cuda_graphs=False"):
        GraphedStep(model, params)


def test_graph_rows_are_the_recipe_rows_with_graphs_and_checkpoints_on_the_gpu():
    for graphed, plain in (("fast_2x1_graphs_fp16", "fast_2x1_fp16"),
                           ("fast_2x1_graphs_corpus_fp16", "fast_2x1_corpus_fp16")):
        row, base = config_by_name(graphed), config_by_name(plain)
        assert row.fast.cuda_graphs and not row.fast.offload_checkpoints
        assert replace(row, name=plain, prediction=base.prediction,
                       fast=replace(row.fast, cuda_graphs=False, offload_checkpoints=True)) == base
    assert not any(c.fast.cuda_graphs for name, c in CONFIGS_BY_NAME.items() if "graphs" not in name)


def test_strict_runs_repeat_and_compare_original_fast_and_graphed():
    assert set(RECIPE_ROWS) <= set(STRICT8_ROWS)
    pairs = {key: (original, fast) for key, original, fast in RECIPE_PAIRS}
    assert pairs["recipe_twin"] == ("original_fp16", "fast_2x1_fp16")
    assert pairs["recipe_corpus"] == ("original_corpus_fp16", "fast_2x1_corpus_fp16")
    assert pairs["recipe_twin_graphs"] == ("original_fp16", "fast_2x1_graphs_fp16")
    assert pairs["recipe_corpus_graphs"] == ("original_corpus_fp16", "fast_2x1_graphs_corpus_fp16")
    assert {name for pair in pairs.values() for name in pair} == set(RECIPE_ROWS)
    rows = [_strict_row(name, sps, repeat=i) for i in range(3)
            for name, sps in (("original_fp16", 1.0), ("fast_2x1_fp16", 0.4), ("fast_2x1_graphs_fp16", 0.2))]
    rows.append({"name": "fast_2x1_graphs_corpus_fp16", "ok": False, "error": "capture failed"})
    summary = strict_summary(rows)
    assert summary["recipe_twin"]["x_fewer_seconds"] == 2.5
    assert summary["recipe_twin_graphs"]["x_fewer_seconds"] == 5.0
    assert "recipe_corpus_graphs" not in summary and "fast_2x1_graphs_corpus_fp16" in summary["out_of_budget"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the graphed row runs (the GPU tests below)")
def test_a_graph_row_that_fails_becomes_its_rows_error_on_a_cpu(tmp_path):
    from utils.speed.benchmark.measure import child
    from utils.speed.benchmark.run import save_twin

    save_twin(tmp_path, tiny=True, device="cpu")
    config = replace(config_by_name("fast_2x1_graphs_fp16"), max_seq_length=16)
    row = child({"config": asdict(config), "model": str(tmp_path), "steps": 1, "warmup": 0})
    assert row["ok"] is False and "needs a CUDA GPU" in row["error"] and row["name"] == "fast_2x1_graphs_fp16"


# ----------------------------------------------------------------------------------------------------------------
# GPU: the graphed step against the eager fast path on the same batches
# ----------------------------------------------------------------------------------------------------------------


def _gpu_model(dropout: float, options: FastPathOptions):
    model = _tiny_peft(dropout=dropout).cuda()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    enable_fast_path(model, torch.float16, options)
    return model, [p for p in model.parameters() if p.requires_grad]


def _eager_step(model, batch: Batch, num_items: int, scaler) -> float:
    backbone = model.get_base_model().model
    hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    loss = causal_lm_loss(model, hidden, batch.labels, num_items)
    scaler.scale(loss).backward()
    return loss.item()


@CUDA
@pytest.mark.parametrize("keep", ["input", "mid+qkv"])
@pytest.mark.parametrize("dropout", [0.0, 1e-9], ids=["no-dropout", "dropout-path"])  # 1e-9: never drops
def test_graphed_step_matches_the_eager_fast_path_on_gpu(keep, dropout):
    """Same loss and LoRA gradients (GradScaler-scaled, fp16) from two replays of one graph, accumulated; with
    dropout on, through the generator states that replay the checkpointed layers' masks."""
    batches = [_corpus_row([40, 57], seed=1).to("cuda"), _corpus_row([100, 20], seed=2).to("cuda")]
    num_items = sum(b.label_tokens for b in batches)
    model, params = _gpu_model(dropout, replace(GRAPHS, checkpoint_keep=keep, graph_bucket_tokens=64))
    scaler = torch.amp.GradScaler("cuda")
    eager = [_eager_step(model, b, num_items, scaler) for b in batches]
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    step = GraphedStep(model, params, scaler, max_tokens=256)
    step.prepare(batches)
    graphed = []
    for b in batches:
        loss = step(b, num_items)
        scaler.scale(loss).backward()  # what run_optimizer_steps does: nothing more happens
        graphed.append(loss.item())
    assert graphed == pytest.approx(eager, abs=2e-3)
    assert [g["tokens"] for g in step.describe()["graphs"]] == [128] and step.describe()["graphs"][0]["replays"] == 2
    for p, e in zip(params, expected):
        assert (p.grad - e).abs().max().item() / (e.abs().max().item() + 1e-12) < 2e-2


@CUDA
def test_graphed_dropout_draws_new_masks_each_replay_and_its_backward_repeats_them_on_gpu():
    """LoRA dropout 0.5 with checkpoints: two replays of one batch draw different masks (different losses) and
    give finite gradients through the pre-registered generator states."""
    batch = _corpus_row([40, 57], seed=1).to("cuda")
    model, params = _gpu_model(0.5, GRAPHS)
    step = GraphedStep(model, params, None, max_tokens=128)
    step.prepare([batch])
    first = step(batch, batch.label_tokens).item()
    model.zero_grad(set_to_none=True)
    second = step(batch, batch.label_tokens).item()
    assert first != second
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert step.describe()["graphs"][0]["rng_states"] > 0
