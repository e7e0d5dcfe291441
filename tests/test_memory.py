"""utils.memory: analytic sizes against real tensors, the child-process measurements, the committed H100 file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from utils import memory
from utils.device import dtype_name
from utils.modeling import build_tiny_twin, build_twin, tiny_twin_config, twin_config
from utils.paths import REPO_ROOT
from utils.numbers import fmt_num
from utils.reports import memory as memory_report
from utils.units import GIB, MIB

GPU_REPORT = REPO_ROOT / "results" / "02_twin_gpu_memory.json"
TWIN_PARAMETERS = 3_212_749_824
TWIN_LORA = 48_627_712


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama saved as bf16 safetensors (loads in every format in about a second)."""
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_twin("cpu").save_pretrained(folder, safe_serialization=True)
    return str(folder)


def _load(folder: str, fmt: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memory.load_for_measurement(folder, fmt, "cpu")


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def test_twin_counts_match_the_architecture_per_tensor_kind():
    table = memory.parameter_count_table(twin_config(), build_twin("meta"))
    assert table["coincide"].all(), table
    assert table.iloc[-1]["analítico"] == TWIN_PARAMETERS


def test_embedded_counts_match_the_loaded_model(embedded_model):
    config = memory.load_model_config("embedded")
    table = memory.parameter_count_table(config, embedded_model)
    assert table["coincide"].all(), table
    assert table.iloc[-1]["contado en el modelo"] == sum(p.numel() for p in embedded_model.parameters())
    # tied embeddings are counted once, and the kinds cover every parameter
    assert "lm_head (sin atar)" not in set(table["tipo de tensor"])


def test_four_bit_params_are_unpacked_to_two_weights_per_byte(tiny_folder):
    model = _load(tiny_folder, "nf4")
    config = model.config
    packed = memory.measured_parameter_counts(model, unpack_4bit=False)
    unpacked = memory.measured_parameter_counts(model)
    analytic = memory.analytic_parameter_counts(config)
    assert unpacked["attention"] == analytic["attention"] and unpacked["mlp"] == analytic["mlp"]
    assert packed["attention"] * 2 == analytic["attention"]


# --------------------------------------------------------------------------------------------
# Analytic bytes per format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "fp4", "nf4", "nf4_dq"])
def test_analytic_bytes_equal_footprint_plus_bitsandbytes_constants(tiny_folder, fmt):
    model = _load(tiny_folder, fmt)
    other = dtype_name(model.model.embed_tokens.weight.dtype)
    analytic = memory.analytic_weight_bytes(model.config, fmt, other)
    assert model.get_memory_footprint() + memory.quant_state_bytes(model) == analytic["total"]
    assert memory.quant_state_bytes(model) == analytic["linear_constants"]


def test_four_bit_constants_match_bitsandbytes():
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 200)  # 19,200 weights: 300 blocks of 64, two second-level blocks of 256
    for double in (False, True):
        _, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
        held = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
        if double:
            held += 4 + state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
        assert memory.four_bit_constant_bytes(w.numel(), double) == held


def test_committed_gpu_weights_equal_the_analytic_sizes():
    report = memory.load_gpu_report(GPU_REPORT)
    config = twin_config()
    for res in report["weights"]:
        analytic = memory.analytic_weight_bytes(config, res["format"], res["other_dtype"])
        assert res["footprint_bytes"] + res["quant_state_bytes"] == analytic["total"], res["format"]
        # what the caching allocator adds: rounding of each tensor to 512-byte blocks, well under 2 MiB
        assert 0 <= res["weights_bytes"] - analytic["total"] < 2 * MIB, res["format"]
        assert res["parameters"] == TWIN_PARAMETERS


# --------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------


def test_committed_training_steps_match_the_analytic_breakdown():
    report = memory.load_gpu_report(GPU_REPORT)
    config = twin_config()
    for res in report["train"]:
        assert res["ok"], res
        shapes = memory.lora_tensor_shapes(config)
        assert res["lora_parameters"] == TWIN_LORA
        assert res["lora_param_bytes"] == res["grad_bytes"] == 4 * TWIN_LORA
        assert res["optimizer_state_bytes"] == memory.optimizer_state_bytes(shapes, res["optim"])
        analytic = memory.analytic_training_breakdown(config, res["format"], res["variant"], res["amp_dtype"])
        assert res["optimizer_paged_bytes"] == analytic["optimizer_paged"]
        # exact parts: the weights the step starts from (allocator rounding aside)
        assert abs(res["weights_bytes"] - analytic["weights"]) < 4 * MIB, res["name"]
        # estimated parts: the whole peak within 10 % (activations are the estimate)
        assert abs(res["peak_bytes"] - analytic["total"]) < 0.10 * res["peak_bytes"], res["name"]


def test_prepare_for_kbit_training_upcasts_embeddings_and_norms_to_fp32():
    report = memory.load_gpu_report(GPU_REPORT)
    train = {r["name"]: r for r in report["train"]}
    config = twin_config()
    extra = train["qlora_fp16_prepare"]["weights_bytes"] - train["qlora_fp16_no_prepare_gc"]["weights_bytes"]
    # embeddings and norms go from 2 to 4 bytes (plus allocator rounding)
    counts = memory.analytic_parameter_counts(config)
    assert 0 <= extra - 2 * (counts["embedding"] + counts["norms"]) < 4 * MIB


def test_committed_gpu_report_names_its_machine_and_the_original_configuration():
    report = json.loads(GPU_REPORT.read_text())
    assert report["label"] == memory.TWIN_LABEL
    assert "H100" in report["device"]
    for lib in ("torch", "transformers", "peft", "bitsandbytes"):
        assert report["versions"][lib] not in ("", "absent")
    assert report["date"][:4].isdigit()
    assert {r["format"] for r in report["weights"]} >= {"bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq"}
    original = report["train"][0]
    assert (original["format"], original["variant"], original["amp_dtype"]) == ("nf4_dq", "prepare", "fp16")
    assert (original["batch_size"], original["grad_accum"], original["max_seq_length"]) == (1, 2, 512)
    assert original["optim"] == "paged_adamw_8bit"


def test_training_step_child_measures_a_tiny_model(tiny_folder):
    res = memory.run_child({"task": "train_step", "name": "t", "model": tiny_folder, "format": "nf4_dq",
                            "variant": "prepare", "amp_dtype": None, "max_seq_length": 16, "batch_size": 1,
                            "grad_accum": 2, "optim": "paged_adamw_8bit", "steps": 1, "device": "cpu",
                            "use_cache": False}, timeout=300)
    assert res["ok"], res
    shapes = memory.lora_tensor_shapes(tiny_twin_config())
    assert res["lora_parameters"] == sum(math.prod(s) for s in shapes)
    assert res["optimizer_state_bytes"] == memory.optimizer_state_bytes(shapes, "paged_adamw_8bit")
    assert res["peak_bytes"] > res["weights_bytes"] > 0
    assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"])


# --------------------------------------------------------------------------------------------
# Measurement plumbing and errors a user can cause
# --------------------------------------------------------------------------------------------


def test_weights_child_reports_resident_memory_on_cpu(tiny_folder):
    res = memory.run_child({"task": "weights", "model": tiny_folder, "format": "bf16", "device": "cpu"}, timeout=300)
    assert res["ok"] and res["measure"].startswith("RSS")
    table = memory.weights_table([res], tiny_twin_config())
    # the 4 MB model: resident growth within a few MiB of the analytic size (allocator and page slack)
    assert abs(table.loc[0, "brecha_mib"]) < 16


def test_quantization_error_is_lower_for_nf4_than_fp4(tiny_folder):
    errors = memory.quantization_errors(_load(tiny_folder, "fp32"))
    mean = errors.groupby("formato")["error_relativo"].mean()
    assert mean["nf4"] < mean["fp4"]
    assert abs(mean["nf4_dq"] - mean["nf4"]) < 0.01 * mean["nf4"] + 1e-4
    assert len(errors) == 2 * 7 * 3


def test_unknown_format_names_the_parameter():
    with pytest.raises(ValueError, match="formats"):
        memory.supported_formats(["fp32", "nf3"])


def test_missing_gpu_report_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu-report"):
        memory.load_gpu_report(tmp_path / "none.json")


def test_gpu_report_without_gpu_fails_with_one_clear_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "utils.memory", "gpu-report", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 1
    assert "CUDA GPU" in proc.stderr and "--tiny" in proc.stderr


# --------------------------------------------------------------------------------------------
# What the notebooks can measure live (the profile's weights may be missing)
# --------------------------------------------------------------------------------------------

MISSING_LLAMA = "no-such-owner/Llama-3.2-3B-Instruct"  # never in any hub cache


def test_live_model_falls_back_to_the_twin_when_the_llama_weights_are_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    live = memory.resolve_live_model(MISSING_LLAMA, "02", GPU_REPORT)
    assert not live.available and live.weights_name is None and live.stand_in is None
    assert memory.config_dict(live.config) == memory.config_dict(twin_config())
    assert "not reachable" in live.reason
    # the one note says why, how to get the weights (the error's advice) and where the GPU numbers come from
    report = memory.load_gpu_report(GPU_REPORT)
    assert f"hf download {MISSING_LLAMA}" in live.note and "no están disponibles" in live.note
    assert report["device"] in live.note and report["date"][:10] in live.note
    assert "Se omite" in live.note and "meta" in live.note
    assert live.unquantized_dtype("cpu")[0] == "fp16"  # the thesis GPU's dtype, not this CPU's fp32
    (tmp_path / "02_quality.csv").write_text("stale")
    line = live.skip("la pérdida", tmp_path, ["02_quality.csv", "absent.csv"])
    assert "Se omite la pérdida" in line and "02_quality.csv" in line and not (tmp_path / "02_quality.csv").exists()
    assert live.as_record()["skipped_steps"] == {"la pérdida": live.skipped_steps["la pérdida"]}
    # notebook 03 runs its B = 0 check on the embedded model instead, and says so
    live03 = memory.resolve_live_model(MISSING_LLAMA, "03", GPU_REPORT)
    assert live03.weights_name == "embedded" and "Sustituto" in live03.note


def test_live_model_is_live_for_the_embedded_model():
    live = memory.resolve_live_model("embedded", "02", GPU_REPORT)
    assert live.available and live.note == "" and live.reason is None and live.weights_name == "embedded"
    assert live.config.hidden_size == 576 and live.unquantized_dtype("cpu")[0] == "fp32"


def test_a_missing_model_of_another_architecture_still_raises(monkeypatch):
    from utils.modeling import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="Only Llama-3.2-3B"):
        memory.resolve_live_model("no-such-owner/Mistral-7B-v0.1", "02", GPU_REPORT)
    with pytest.raises(ModelNotAvailableError, match="model_name"):  # a malformed name is not a missing model
        memory.resolve_live_model("not a model", "02", GPU_REPORT)


def test_a_folder_with_the_llama_config_but_no_weights_falls_back(tmp_path):
    twin_config().save_pretrained(tmp_path)
    live = memory.resolve_live_model(str(tmp_path), "03", GPU_REPORT)
    assert not live.available and "safetensors" in live.reason


def test_findings_without_live_measurements_use_the_analytic_sizes():
    report = memory.load_gpu_report(GPU_REPORT)
    config = twin_config()
    analytic = memory.analytic_weight_table(config, ["fp32", "bf16", "nf4_dq"], "fp16")
    text = memory_report.describe_findings(None, None, None, None, memory.weights_table(report["weights"], config),
                                    memory.training_table(report["train"]), "Llama-3.2-3B (gemelo)",
                                    analytic=analytic, skipped_steps={"la sección 3": "sin pesos"})
    ratio = analytic["total_gib"].iloc[0] / analytic["total_gib"].iloc[2]
    assert f"{fmt_num(ratio, 1)}×" in text and "No medido en esta corrida**: la sección 3 (motivo: sin pesos)" in text
    assert "gemelo, medido en GPU" in text  # the committed measurements still reach the conclusions
    # the seed's "~6 GB" whole model: the twin's 16-bit weights, 6,43 GB = 5,98 GiB
    assert "= 6,43\xa0GB = 5,98\xa0GiB" in text and "3.212.749.824 parámetros" in text
    # the card's 8 GiB less the CUDA context, and less the Windows display's reserve too: 5,338 GiB reserved leaves
    # 2,16 and 1,66 GiB; the fp16-weights LoRA (7,836 GiB) fits neither; bf16 is flagged on the thesis's Turing card
    assert "margen 2,16\xa0GiB; bajo Windows, con la pantalla en la misma tarjeta, 0,5\xa0GiB menos: 1,66\xa0GiB" in text
    assert "LoRA sobre pesos fp16, con checkpointing: 7,836\xa0GiB reservados (no cabe)" in text
    assert "QLoRA bf16, con prepare: 5,338\xa0GiB reservados (cabe; la RTX 2070 SUPER (Turing) no calcula" in text
    assert "(QLoRA fp16, con prepare)" in text and "(original))" not in text


def test_twin_verdicts_separate_the_card_with_and_without_the_windows_display():
    from utils.reports.memory import _twin_train_lines

    rows = [dict(configuración=f"row{i}", formato="nf4_dq", variante="prepare", cómputo="fp16",
                 pico_gib=g - 0.2, pico_reservado_gib=g) for i, g in enumerate((5.0, 7.2, 7.6))]
    lines = _twin_train_lines(pd.DataFrame(rows), 8.0)  # 7,5 GiB usable; 7,0 with the display on the same card
    assert lines[1].endswith("7,200\xa0GiB reservados (cabe solo si la tarjeta no maneja además la pantalla).")
    assert lines[2].endswith("7,600\xa0GiB reservados (no cabe).")


# The strict 8 GB budget's accounting (utils.memory.budget; the benchmark's --budget strict8)

def test_strict_budget_counts_context_and_memory_outside_the_allocator():
    from utils.memory.budget import strict_budget_use

    # under the 6.99 GiB allocator cap, yet over the card once the context and the paged states are added
    over = strict_budget_use(peak_reserved_gib=6.9, outside_allocator_gib=0.15, cuda_context_gib=0.51,
                             pinned_host_gib=3.0)
    assert over["device_gib"] == pytest.approx(7.56) and over["device_limit_gib"] == 7.5
    assert not over["in_budget"] and over["over"] == ["GPU 7.56 GiB > 7.5 GiB"]
    fits = strict_budget_use(peak_reserved_gib=6.7, outside_allocator_gib=0.15, cuda_context_gib=0.51,
                             pinned_host_gib=3.0)
    assert fits["in_budget"] and fits["device_headroom_gib"] == pytest.approx(0.14)
    # a measurement that misses unified memory: the paged states counted stand in for it
    missed = strict_budget_use(peak_reserved_gib=6.7, outside_allocator_gib=0.0, cuda_context_gib=0.51,
                               pinned_host_gib=0.0, paged_optimizer_gib=0.4)
    assert missed["device_gib"] == pytest.approx(7.61) and not missed["in_budget"]


def test_strict_budget_refuses_more_than_four_gib_of_pinned_host_memory():
    from utils.memory.budget import strict_budget_use

    use = dict(peak_reserved_gib=5.0, outside_allocator_gib=0.1, cuda_context_gib=0.5)
    assert strict_budget_use(**use, pinned_host_gib=4.0)["in_budget"]
    over = strict_budget_use(**use, pinned_host_gib=4.01)
    assert not over["in_budget"] and over["over"] == ["pinned host memory 4.01 GiB > 4 GiB"]


def test_outside_allocator_tracker_subtracts_the_baseline_and_the_allocator():
    from utils.memory.budget import OutsideAllocatorTracker

    other = 3 * GIB  # another process on the GPU (the parent that saved the twin): constant, cancels out
    readings = iter([
        (other + 600 * MIB, 2 * MIB),  # baseline: context + a 2 MiB block
        (other + 600 * MIB + 5 * GIB + 200 * MIB, 5 * GIB + 2 * MIB),  # model + 200 MiB outside
        (other + 600 * MIB + 6 * GIB + 350 * MIB, 6 * GIB + 2 * MIB),  # + paged states: 350 MiB outside
        (other + 600 * MIB + 4 * GIB + 350 * MIB, 4 * GIB + 2 * MIB),  # the allocator gave blocks back
    ])
    tracker = OutsideAllocatorTracker(read=lambda: next(readings))
    assert [tracker.sample() for _ in range(3)] == [200 * MIB, 350 * MIB, 350 * MIB]
    assert tracker.peak == 350 * MIB


def test_paged_optimizer_states_are_counted_through_a_wrapped_optimizer():
    from utils.memory.budget import paged_state_bytes

    def paged(n):
        t = torch.zeros(n, dtype=torch.uint8)
        t.is_paged = True  # what bitsandbytes' get_paged marks on its cudaMallocManaged tensors
        return t

    class Inner:
        state = {"p": {"state1": paged(1000), "state2": paged(1000), "absmax1": torch.zeros(4)}}

    class Flat:  # like utils.speed.optim.FlatOptimizer: its own state empty, the inner one's paged
        state = {"q": {"step": 3}}
        inner = Inner()

    assert paged_state_bytes(Flat()) == 2000
    assert paged_state_bytes(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])) == 0


def test_pinned_host_memory_is_the_larger_of_the_counted_buffers_and_the_allocator():
    from utils.memory.budget import pinned_host_bytes

    buffers = [torch.zeros(96, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.float32)]
    assert pinned_host_bytes(buffers) == 96 * 2 + 32 * 4
    # the pinned allocator rounds each block up to a power of two: what it owns is what the host gives up
    assert pinned_host_bytes(buffers, {"allocated_bytes.peak": 512}) == 512
    assert pinned_host_bytes(buffers, {"allocated_bytes.peak": 100}) == 320
