"""tools/gemm_dtypes.py: the fast path's GEMM shapes, the per-step weighting, and a CPU run of the logic."""

from __future__ import annotations

import sys

import pytest

from utils.files import read_json, save_json
from utils.paths import REPO_ROOT, TWIN_CONFIG_FILE

sys.path.insert(0, str(REPO_ROOT / "tools"))
import gemm_dtypes  # noqa: E402


def test_the_layer_gemms_of_llama_3_2_3b_carry_the_lora_columns_in_k():
    config = read_json(TWIN_CONFIG_FILE)
    plain = {g.name: g for g in gemm_dtypes.layer_gemms(config, 16384, 32, padded=False)}
    padded = {g.name: g for g in gemm_dtypes.layer_gemms(config, 16384, 32, padded=True)}
    qkv, gate_up = "q/k/v [x | xA]·[W | αB]ᵀ", "gate/up [x | xA]·[W | αB]ᵀ"
    assert (plain[qkv].m, plain[qkv].n, plain[qkv].k) == (16384, 5120, 3072 + 96)  # 24 + 2 × 8 heads of 128
    assert (plain[gate_up].n, plain[gate_up].k) == (16384, 3072 + 64)
    assert padded[qkv].k == padded[gate_up].k == 3200  # rounded up to a multiple of 128
    assert padded["q/k/v input gradient"].k_stride == 3200 and plain["q/k/v input gradient"].k_stride == 3168
    assert plain["down_proj x·Wᵀ (addmm)"].k == 8192 and plain["down_proj x·Wᵀ (addmm)"].per_layer == 1
    assert plain["o_proj x·Wᵀ (addmm)"] == padded["o_proj x·Wᵀ (addmm)"]  # K = 3072 needs no padding


def test_the_step_estimate_weighs_each_gemm_by_its_runs_and_layers_and_swaps_in_the_padded_ones():
    def row(name, per_layer, fp16, bf16, padded=False):
        return {"name": name, "per_layer": per_layer, "fp16_ms": fp16, "bf16_ms": bf16, "padded": padded,
                "blas": "cublas"}

    rows = [row("a", 2, 1.0, 0.5), row("b", 1, 3.0, 3.0), row("a", 2, 0.5, 0.5, padded=True)]
    other = [{**r, "blas": "cublaslt", "fp16_ms": 2 * r["fp16_ms"]} for r in rows]
    estimates = gemm_dtypes.step_estimate(rows + other, layers=10)
    assert list(estimates) == ["cublas", "cublaslt"]  # one estimate per library, from its own rows only
    assert estimates["cublaslt"]["plain_fp16_ms"] == 2 * estimates["cublas"]["plain_fp16_ms"]
    estimate = estimates["cublas"]
    assert estimate["plain_fp16_ms"] == 10 * (2 * 1.0 + 3.0)
    assert estimate["plain_bf16_ms"] == 10 * (2 * 0.5 + 3.0)
    assert estimate["padded_fp16_ms"] == estimate["padded_bf16_ms"] == 10 * (2 * 0.5 + 3.0)
    assert estimate["plain_fp16_over_bf16"] == pytest.approx(50 / 40, abs=1e-4)


def test_a_cpu_run_times_every_shape_in_both_dtypes_and_writes_its_report(tmp_path, capsys):
    out, config = tmp_path / "g.json", tmp_path / "config.json"
    save_json({"hidden_size": 96, "intermediate_size": 128, "num_attention_heads": 6, "num_key_value_heads": 2,
               "head_dim": 16, "num_hidden_layers": 2}, config)
    assert gemm_dtypes.main(["--device", "cpu", "--config", str(config), "--tokens", "8", "--repeats", "1",
                             "--warmup", "0", "--out", str(out)]) == 0
    report = read_json(out)
    assert report["tokens"] == 8 and report["layers"] == 2 and report["commit"]
    # 8 GEMMs, 4 of them again with K padded (96 + 3 × 32 and 96 + 2 × 32 → 256)
    assert len(report["rows"]) == 8 + 4
    assert all(r["fp16_ms"] > 0 and r["bf16_ms"] > 0 and r["blas"] == "default" for r in report["rows"])
    assert set(report["step_estimate"]["default"]) == {"plain_fp16_ms", "plain_bf16_ms", "padded_fp16_ms",
                                                       "padded_bf16_ms", "plain_fp16_over_bf16",
                                                       "padded_fp16_over_bf16"}
    assert f"wrote {out}" in capsys.readouterr().out


def test_impossible_arguments_stop_with_the_setting_named(tmp_path):
    with pytest.raises(SystemExit):
        gemm_dtypes.main(["--device", "cpu", "--tokens", "0", "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit):
        gemm_dtypes.main(["--device", "cpu", "--config", str(tmp_path / "missing.json")])
    assert not (tmp_path / "g.json").exists()
