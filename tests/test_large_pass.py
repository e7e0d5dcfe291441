"""The large-pass correctness check (issue #20, item 3): its options, refusals, configurations, batches, verdict."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict

import pytest
import torch

from utils.config import THESIS
from utils.paths import REPO_ROOT
from utils.speed.benchmark import cli
from utils.speed.benchmark import large_pass as lp
from utils.speed.benchmark.configs import BenchConfig
from utils.speed.fastpath import causal_lm_loss
from utils.train_step import Batch

sys.path.insert(0, str(REPO_ROOT / "tools"))
import large_pass_forward  # noqa: E402


def test_cli_parses_the_options_and_keeps_the_other_commands():
    args = cli.build_parser().parse_args(["correctness-large"])
    assert (args.out, args.model, args.steps, args.micro_batch, args.dtype, args.kernels, args.no_offload,
            args.seeds) == ("results/04_large_pass_correctness.json", "embedded", 30, 16, "bf16", "liger", False,
                            [0, 1])
    args = cli.build_parser().parse_args(["correctness-large", "--micro-batch", "32", "--dtype", "fp16", "--kernels",
                                          "torch", "--no-offload", "--seeds", "3,7", "--steps", "5"])
    assert (args.micro_batch, args.dtype, args.kernels, args.no_offload, args.seeds, args.steps) == \
        (32, "fp16", "torch", True, [3, 7], 5)
    assert (args.lora_dropout, args.peft_noprep) == (0.05, False)
    args = cli.build_parser().parse_args(["correctness-large", "--lora-dropout", "0", "--peft-noprep",
                                          "--fp32-residual"])
    assert (args.lora_dropout, args.peft_noprep, args.fp32_residual) == (0.0, True, True)
    assert cli.build_parser().parse_args(["correctness-large", "--dtype", "fp32"]).dtype == "fp32"  # the reference
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["correctness-large", "--kernels", "triton"])
    assert cli.build_parser().parse_args(["correctness", "--steps", "7"]).steps == 7
    assert cli.COMMANDS["correctness"] is cli._correctness


@pytest.mark.parametrize("kwargs, message", [
    (dict(micro_batch=1), "--micro-batch 1: use 2 or more"),
    (dict(seeds=(0, 0)), "--seeds 0,0: give two different seeds"),
    (dict(steps=1), "--steps 1: use 2 or more"),
])
def test_impossible_requests_name_the_option(kwargs, message):
    request = {"micro_batch": 16, "seeds": (0, 1), "steps": 30, "kernels": "liger", **kwargs}
    with pytest.raises(SystemExit, match=message):
        lp.check_large_pass_request(**request)


def test_without_cuda_one_clear_error_and_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "large.json"
    with pytest.raises(SystemExit, match="correctness-large needs a CUDA GPU .* Run it on the GPU machine"):
        cli.main(["correctness-large", "--out", str(out)])
    assert not out.exists()


def test_without_cuda_the_logic_check_runs_in_fp32(monkeypatch, tmp_path):
    """--kernels torch --no-offload is the CPU's check: accepted, its report says fp32 and compares both paths."""
    from utils.modeling import build_tiny_twin

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    build_tiny_twin("cpu").save_pretrained(tmp_path / "twin")
    monkeypatch.setattr(lp, "run_child", lambda task, timeout, env: lp.large_pass_child(task))
    report = lp.run_large_pass_correctness(tmp_path / "large.json", str(tmp_path / "twin"), steps=2, micro_batch=2,
                                           options=lp.LargePassOptions(kernels="torch", offload=False))
    assert report["dtype"] == "fp32" and [r["name"] for r in report["runs"]] == [
        "peft_seed0", "fast_seed0", "peft_seed1", "fast_seed1"]
    assert report["comparison"]["same_batches"] is True and report["comparison"]["missing"] == []


def test_forced_liger_without_its_packages_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lp, "missing_kernel_packages", lambda: ["triton", "liger-kernel"])
    with pytest.raises(SystemExit, match="--kernels liger needs triton and liger-kernel .*pip install liger-kernel"
                                         ".*--kernels torch"):
        lp.check_large_pass_request(16, (0, 1), 30, "liger")
    lp.check_large_pass_request(16, (0, 1), 30, "torch")  # PyTorch's ops need neither package


def test_the_two_configurations_of_a_seed():
    peft, fast = lp.large_pass_configs(3, 16, lp.LargePassOptions(dtype="bf16", kernels="liger", offload=True))
    assert (peft.name, fast.name) == ("peft_seed3", "fast_seed3")
    assert (peft.impl, peft.prepare, peft.optim) == ("hf", True, "paged_adamw_8bit")  # the original recipe's setup
    assert fast.impl == "fast" and fast.fast.kernels == "liger" and fast.fast.offload_checkpoints
    for config in (peft, fast):
        assert (config.micro_batch, config.accumulation, config.workload, config.dtype) == (16, 1, "corpus", "bf16")
        assert config.lora_dropout == THESIS.lora_dropout == 0.05
        assert BenchConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config  # what the child rebuilds
    _, on_gpu = lp.large_pass_configs(0, 4, lp.LargePassOptions(dtype="fp16", kernels="torch", offload=False))
    assert (on_gpu.fast.kernels, on_gpu.fast.offload_checkpoints, on_gpu.dtype, on_gpu.micro_batch) == \
        ("torch", False, "fp16", 4)


def _examples(lengths: list[int]) -> list[dict]:
    """Fabricated tokenized examples: distinct ids, the second half of each example labelled."""
    out, start = [], 0
    for n in lengths:
        ids = list(range(start, start + n))
        out.append({"ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
        start += n
    return out


def _real_ids(batch: Batch) -> list[int]:
    """The non-padding ids of a micro-batch, row after row."""
    if batch.attention_mask is None:
        return batch.input_ids.reshape(-1).tolist()
    return batch.input_ids[batch.attention_mask.bool()].tolist()


def test_both_paths_get_the_same_examples_per_step_in_order():
    examples = _examples([5, 9, 3, 700, 4, 8, 6])  # one long example: a token budget would split differently
    peft, fast = lp.large_pass_configs(0, micro_batch=4)
    peft_plan, fast_plan = lp.step_plan(peft, examples, 3), lp.step_plan(fast, examples, 3)
    assert len(peft_plan) == len(fast_plan) == 3
    for step, (p, f) in enumerate(zip(peft_plan, fast_plan)):
        assert len(p) == len(f) == 1
        chosen = [examples[(4 * step + i) % len(examples)] for i in range(4)]  # cycling in corpus order
        assert _real_ids(p[0]) == _real_ids(f[0]) == [t for e in chosen for t in e["ids"]]
        assert p[0].input_ids.shape[0] == 4 and f[0].input_ids.shape[0] == 1  # padded batch vs one packed row
        assert int((f[0].position_ids == 0).sum()) == 4  # exactly micro_batch examples in the row
        assert p[0].label_tokens == f[0].label_tokens and p[0].tokens == f[0].tokens


def _run(name: str, losses: list[float], label_tokens: list[int] | None = None, **extra) -> dict:
    impl = "fast" if name.startswith("fast") else "hf"
    return {"name": name, "impl": impl, "ok": True, "losses": losses,
            "label_tokens_per_step": label_tokens or [10] * len(losses), **extra}


def _fast_extra(calls: dict | None = None, described: str = "liger") -> dict:
    calls = calls if calls is not None else {"rope_triton": 6, "rms_norm_liger": 12, "swiglu_liger": 6}
    return {"fast": {"kernels": "liger"}, "kernel_calls": calls, "details": {"fast_path": {"kernels": described}}}


BASE = [3.0, 2.8, 2.6, 2.5, 2.4]


def _four(fast_offset: float, fast_extra: dict | None = None) -> list[dict]:
    """PEFT and fast runs of seeds 0 and 1: seed 1 is 0.02 off per step, the fast path ``fast_offset`` off."""
    seed1 = [x + 0.02 * (-1) ** i for i, x in enumerate(BASE)]
    extra = fast_extra if fast_extra is not None else _fast_extra()
    return [_run("peft_seed0", BASE), _run("fast_seed0", [x + fast_offset for x in BASE], **extra),
            _run("peft_seed1", seed1), _run("fast_seed1", [x - fast_offset for x in seed1], **extra)]


def test_fast_path_within_seed_noise_agrees():
    comparison = lp.compare_large_pass(_four(0.005))
    assert comparison["agree_within_seed_noise"] is True
    assert comparison["fast_vs_peft_seed0"] == pytest.approx(0.005)
    assert comparison["peft_seed_vs_seed"] == pytest.approx(0.02)
    assert comparison["per_step_fast_vs_peft_seed1"] == pytest.approx([0.005] * 5)
    assert comparison["same_batches"] and comparison["forced_kernels_ran"] and comparison["missing"] == []


def test_fast_path_beyond_seed_noise_disagrees():
    comparison = lp.compare_large_pass(_four(0.05))
    assert comparison["agree_within_seed_noise"] is False
    assert comparison["fast_vs_peft_seed0"] == pytest.approx(0.05)


def test_a_missing_run_leaves_the_verdict_open():
    runs = _four(0.005)
    runs[3] = {**runs[3], "ok": False, "error": "out of memory"}
    comparison = lp.compare_large_pass(runs)
    assert comparison["agree_within_seed_noise"] is None and comparison["missing"] == ["fast_seed1"]


def test_different_batches_and_unforced_kernels_are_flagged():
    runs = _four(0.005, _fast_extra(described="liger (torch below 4096 tokens per pass)"))
    runs[0] = {**runs[0], "label_tokens_per_step": [11] * 5}
    comparison = lp.compare_large_pass(runs)
    assert comparison["same_batches"] is False and comparison["forced_kernels_ran"] is False
    no_swiglu = _four(0.005, _fast_extra({"rope_triton": 6, "rms_norm_liger": 12, "swiglu_liger": 0}))
    assert lp.compare_large_pass(no_swiglu)["forced_kernels_ran"] is False


def test_kernel_calls_are_counted_and_the_functions_restored(monkeypatch):
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

    module = types.ModuleType("fake_kernels_for_test")
    module.Double = Double
    monkeypatch.setitem(sys.modules, module.__name__, module)
    targets = {"double": (module.__name__, "Double"), "absent": ("no_such_kernel_package_here", "Fn")}
    with lp.count_kernel_calls(targets) as calls:
        assert sys.modules[module.__name__].Double.apply(torch.ones(2)).tolist() == [2.0, 2.0]
        sys.modules[module.__name__].Double.apply(torch.ones(2))
    assert calls == {"double": 2, "absent": None}
    assert module.Double is Double


def test_child_tasks_go_to_their_own_runner(monkeypatch):
    monkeypatch.setattr(cli, "large_pass_child", lambda task: {"ran": "large"})
    monkeypatch.setattr(cli, "child", lambda task: {"ran": "benchmark"})
    assert cli._child({"kind": lp.LARGE_PASS_TASK}) == {"ran": "large"}
    assert cli._child({"config": {}}) == {"ran": "benchmark"}


def test_tiny_twin_trains_both_paths_on_the_same_batches(tmp_path):
    """On the CPU (PyTorch's ops, fp32): identical weights give identical first losses on both paths."""
    from utils.modeling import build_tiny_twin

    build_tiny_twin("cpu").save_pretrained(tmp_path)
    rows = [lp.train_large_pass(config, str(tmp_path), 3, 0)
            for config in lp.large_pass_configs(0, 3, lp.LargePassOptions(kernels="torch", offload=False))]
    peft, fast = rows
    assert peft["label_tokens_per_step"] == fast["label_tokens_per_step"]
    assert peft["tokens_per_step"] == fast["tokens_per_step"]
    assert fast["losses"][0] == pytest.approx(peft["losses"][0], abs=1e-4)
    assert fast["losses"] == pytest.approx(peft["losses"], abs=2e-3)
    assert fast["details"]["fast_path"]["kernels"] == "torch"


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_large_pass_rows_run_with_the_forced_kernels(tmp_path):
    """Three steps at micro-batch 4 on the embedded model: four rows, the forced kernels counted in the fast ones."""
    report = lp.run_large_pass_correctness(tmp_path / "large.json", steps=3, micro_batch=4, timeout=600)
    assert [r["name"] for r in report["runs"]] == ["peft_seed0", "fast_seed0", "peft_seed1", "fast_seed1"]
    assert all(r.get("ok") for r in report["runs"]), [r.get("error") for r in report["runs"]]
    assert all(r["forced_kernels_ran"] for r in report["runs"] if r["impl"] == "fast")
    assert all(not any((r["kernel_calls"] or {}).values()) for r in report["runs"] if r["impl"] == "hf")
    assert report["comparison"]["same_batches"] is True
    assert json.loads((tmp_path / "large.json").read_text())["comparison"]["missing"] == []


def test_the_diagnostic_variants_change_both_paths_or_only_peft():
    """--lora-dropout sets both paths' dropout; --peft-noprep drops PEFT's fp32 upcast and leaves the fast path."""
    peft, fast = lp.large_pass_configs(0, options=lp.LargePassOptions(lora_dropout=0.0, peft_prepare=False))
    assert (peft.lora_dropout, fast.lora_dropout, peft.prepare) == (0.0, 0.0, False)
    default_peft, default_fast = lp.large_pass_configs(0)
    assert default_peft.prepare is True and default_fast == fast.__class__(**{**fast.__dict__, "lora_dropout": 0.05})
    assert lp.large_pass_configs(0, options=lp.LargePassOptions(fp32_residual=True))[1].fast.fp32_residual is True
    assert default_fast.fast.fp32_residual is False
    method = lp._method(30, 16, lp.LargePassOptions(lora_dropout=0.0, peft_prepare=False))
    assert "without prepare_model_for_kbit_training" in method and "dropout 0.0" in method


def test_the_fast_path_variants_make_one_more_part_as_pefts_and_leave_peft_alone():
    """--attention sdpa, --loss torch and --fast-optim per-tensor change the fast row only, and the report says so."""
    default_peft, default_fast = lp.large_pass_configs(0)
    peft, fast = lp.large_pass_configs(0, options=lp.LargePassOptions(attention="sdpa", fused_loss=False,
                                                                  fast_optim="paged_adamw_8bit"))
    assert peft == default_peft
    assert (fast.fast.attention, fast.fused_loss, fast.optim) == ("sdpa", False, "paged_adamw_8bit")
    assert (default_fast.fast.attention, default_fast.fused_loss, default_fast.optim) == \
        ("auto", True, "paged_adamw_8bit_flat")
    method = lp._method(30, 16, lp.LargePassOptions(attention="sdpa", fused_loss=False, fast_optim="paged_adamw_8bit"))
    assert "attention='sdpa'" in method and "PyTorch cross-entropy" in method and "per-tensor paged" in method
    assert "no autocast (fp32)" in lp._method(30, 16, lp.LargePassOptions(dtype="fp32"))
    assert "no autocast" not in method
    args = cli.build_parser().parse_args(["correctness-large", "--attention", "sdpa", "--loss", "torch",
                                          "--fast-optim", "per-tensor"])
    assert (args.attention, args.loss, args.fast_optim) == ("sdpa", "torch", "per-tensor")


def test_the_unfused_loss_is_the_mean_cross_entropy_over_the_labelled_positions():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    model = type("M", (torch.nn.Module,), {"get_output_embeddings": lambda self: head})()
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, 1, 2, 10]])
    logits = head(hidden)[:, :-1].reshape(-1, 11)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    got = causal_lm_loss(model, hidden, labels, fused=False, chunk=3)  # chunks smaller than the positions
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(causal_lm_loss(model, hidden, labels, num_items=4, fused=False), expected * 6 / 4)


def test_varlen_attention_on_the_cpu_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(lp.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--attention varlen needs a CUDA GPU"):
        lp.check_large_pass_request(4, (0, 1), 3, "torch", offload=False, attention="varlen")


def test_forward_tool_compares_each_path_with_the_fp32_reference():
    """tools/large_pass_forward.py: fast − PEFT per dtype, and each rounded path's distance from PEFT in fp32."""
    gaps = large_pass_forward.compare({"hf_fp32": [3.0, 2.0], "fast_fp32": [3.0, 2.0],
                         "hf_bf16": [3.001, 1.999], "fast_bf16": [2.998, 2.002]})
    assert gaps["fast_minus_peft_fp32"] == [0.0, 0.0]
    assert gaps["fast_minus_peft_bf16"] == [-0.003, 0.003]
    assert gaps["hf_bf16_minus_fp32"] == [0.001, -0.001] and gaps["fast_bf16_minus_fp32"] == [-0.002, 0.002]
    assert "fast_minus_peft_fp16" not in gaps  # no fp16 losses, no fp16 gap
    with pytest.raises(SystemExit):
        large_pass_forward.main(["--dtypes", "fp8"])


def _report(dtype: str, losses: dict[str, list[float]], steps: int = 3, tokens=(10, 11, 12)) -> dict:
    """A correctness-large report of ``losses`` by row name (``peft_seed0``...), the same plan for every row."""
    runs = [{"name": name, "ok": True, "seed": int(name.split("seed")[1]), "losses": values,
             "label_tokens_per_step": list(tokens)} for name, values in losses.items()]
    return {"dtype": dtype, "steps": steps, "micro_batch": 16, "lora_dropout": 0.0, "model": "embedded",
            "runs": runs}


def test_reference_comparison_says_which_path_sits_nearer_fp32(tmp_path):
    """Each bf16 row minus the fp32 PEFT row of its seed: mean |Δ| and signed; errors name what differs."""
    reference = _report("fp32", {"peft_seed0": [3.0, 2.0, 1.0], "fast_seed0": [3.0, 2.0, 1.0]})
    rounded = _report("bf16", {"peft_seed0": [3.0, 2.03, 1.03], "fast_seed0": [3.0, 1.99, 1.01]})
    out = lp.compare_with_reference(rounded, reference)
    assert out["rows"]["peft_seed0"] == {"mean_abs": 0.02, "mean_signed": 0.02}
    assert out["rows"]["fast_seed0"] == {"mean_abs": 0.00667, "mean_signed": 0.0}
    assert out["fast_nearer"] is True
    swapped = _report("bf16", {"peft_seed0": [3.0, 1.99, 1.01], "fast_seed0": [3.0, 2.03, 1.03]})
    assert lp.compare_with_reference(swapped, reference)["fast_nearer"] is False
    with pytest.raises(ValueError, match="--dtype fp32"):
        lp.compare_with_reference(rounded, rounded)
    with pytest.raises(ValueError, match="steps"):
        lp.compare_with_reference(_report("bf16", {"peft_seed0": [1.0] * 4}, steps=4), reference)
    with pytest.raises(ValueError, match="label tokens"):
        lp.compare_with_reference(_report("bf16", {"peft_seed0": [3.0, 2.0, 1.0]}, tokens=(9, 9, 9)), reference)
    for name, report in (("ref.json", reference), ("bf16.json", rounded)):
        (tmp_path / name).write_text(json.dumps(report))
    args = cli.build_parser().parse_args(["large-pass-reference", str(tmp_path / "bf16.json"), "--reference",
                                          str(tmp_path / "ref.json"), "--out", str(tmp_path / "cmp.json")])
    assert cli.COMMANDS[args.command](args) == 0
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["reports"]["bf16.json"]["fast_nearer"] is True and saved["reference"] == "ref.json"


def test_the_cli_hands_its_options_to_the_check(monkeypatch):
    """correctness-large's flags arrive as one LargePassOptions, each where it belongs."""
    got = {}
    monkeypatch.setattr(cli, "run_large_pass_correctness", lambda *args: got.update(args=args))
    args = cli.build_parser().parse_args(["correctness-large", "--dtype", "fp32", "--loss", "torch", "--fast-optim",
                                          "per-tensor", "--no-offload", "--peft-noprep", "--timeout", "60"])
    assert cli.COMMANDS["correctness-large"](args) == 0
    options, timeout = got["args"][5], got["args"][6]
    assert options == lp.LargePassOptions(dtype="fp32", offload=False, peft_prepare=False, fused_loss=False,
                                          fast_optim="paged_adamw_8bit") and timeout == 60
