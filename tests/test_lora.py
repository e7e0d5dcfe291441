"""utils.lora: counts on the twin and the embedded model, sizes on disk, initialisation, the claims table
(and its LaTeX export, ``utils.reports.lora``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from utils import lora, memory
from utils.modeling import build_tiny_twin, build_twin, twin_config
from utils.paths import REPO_ROOT
from utils.memory import prepare
from utils.reports import lora as lora_report
from utils.units import MB

GPU_REPORT = REPO_ROOT / "results" / "02_twin_gpu_memory.json"
TWIN_LORA = 48_627_712
TWIN_BASE = 3_212_749_824


@pytest.fixture(scope="module")
def twin_peft():
    return lora.attach_lora(build_twin("meta"))


@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory):
    """The tiny twin loaded in NF4 + DQ on the CPU, its unquantised tensors in fp16 as a GPU load keeps them."""
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_twin("cpu").save_pretrained(folder, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = memory.load_for_measurement(str(folder), "nf4_dq", "cpu")
    prepare.cast_unquantized(model, torch.float16)
    return model


@pytest.fixture(scope="module")
def prepare_effects(tiny_4bit):
    return prepare.inspect_prepare(tiny_4bit)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_tiny_twin("cpu").float()


def test_twin_trainable_count_is_48_627_712(twin_peft):
    counts = lora.count_parameters(twin_peft)
    assert counts["peft_trainable"] == counts["numel_trainable"] == TWIN_LORA
    assert counts["peft_all"] == TWIN_BASE + TWIN_LORA
    assert lora.analytic_lora_parameters(twin_config()) == TWIN_LORA
    assert lora.per_module_table(twin_peft, twin_config())["coincide"].all()


def test_embedded_counts_match_per_module_and_per_layer():
    config = memory.load_model_config("embedded")
    peft_model = lora.attach_lora(memory.meta_model(config))
    modules = lora.per_module_table(peft_model, config)
    assert modules["coincide"].all()
    layers = lora.per_layer_table(peft_model)
    assert len(layers) == config.num_hidden_layers
    assert layers["total de la capa"].nunique() == 1
    assert layers["total de la capa"].sum() == lora.analytic_lora_parameters(config)


def test_four_bit_numel_undercounts_and_peft_does_not(tmp_path):
    build_tiny_twin("cpu").save_pretrained(tmp_path, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = memory.load_for_measurement(str(tmp_path), "nf4_dq", "cpu")
    config = model.config
    counts = lora.count_parameters(lora.attach_lora(model))
    base = sum(memory.analytic_parameter_counts(config).values())
    linear = sum(o * i for o, i in memory.linear_shapes(config).values()) * config.num_hidden_layers
    assert counts["peft_all"] == base + lora.analytic_lora_parameters(config)
    assert counts["peft_all"] - counts["numel_all"] == linear // 2  # two 4-bit weights per uint8 element
    assert counts["peft_trainable"] == counts["numel_trainable"]


def test_materialised_adapter_has_the_size_of_a_saved_one(tiny_model):
    real = lora.attach_lora(copy.deepcopy(tiny_model))
    with torch.device("meta"):
        shapes_only = lora.attach_lora(memory.meta_model(tiny_model.config))
    saved = lora.saved_adapter_size(real)
    materialised = lora.materialized_adapter_size(shapes_only)
    assert saved == materialised
    assert saved["tensor_bytes"] == lora.analytic_adapter_bytes(tiny_model.config)


def test_twin_adapter_file_is_the_lora_parameters_in_fp32(twin_peft):
    size = lora.materialized_adapter_size(twin_peft)
    assert size["tensor_bytes"] == 4 * TWIN_LORA
    assert 0 < size["file_bytes"] - size["tensor_bytes"] < 100_000  # the safetensors JSON header


def test_sweep_counts_agree_with_peft(tiny_model):
    sweep = lora.lora_sweep(copy.deepcopy(tiny_model), tiny_model.config, "tiny", ranks=[4, 16],
                            save_ranks=[16])
    assert sweep["coincide"].all() and len(sweep) == 6
    saved = sweep.dropna(subset=["MB guardado"])
    header = (saved["MB guardado"] - saved["MB analítico (fp32)"]) * MB
    assert (header.round() == saved["encabezado (bytes)"]).all()
    by_r = sweep[sweep["módulos"] == "all"].set_index("r")["entrenables (PEFT)"]
    assert by_r[16] == 4 * by_r[4]  # linear in r


def test_adapter_starts_as_the_identity(tiny_model):
    peft_model = lora.attach_lora(copy.deepcopy(tiny_model))
    result = lora.check_zero_init(peft_model, torch.randint(0, 2048, (1, 24)))
    assert result["todas las B son cero"] and result["todas las A son distintas de cero"]
    assert result["logits idénticos"] and result["máx |logits adaptado − logits base|"] == 0.0
    with torch.no_grad():  # and a trained B does change the output
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(0.1)
    assert not lora.check_zero_init(peft_model, torch.randint(0, 2048, (1, 24)))["logits idénticos"]


def test_the_claimed_trainable_count_is_llama_3_1_8b():
    found = lora.search_lora_counts(83_886_080)
    assert list(zip(found["arquitectura"], found["r"], found["módulos"])) == [("Llama-3.1-8B", 32, "all")]
    assert lora.search_lora_counts(TWIN_LORA)["arquitectura"].tolist() == ["Llama-3.2-3B"]


def _claims(twin_counts, prepare_effects=None):
    gpu = memory.load_gpu_report(GPU_REPORT)
    return lora.claims_table({
        "prepare": prepare_effects, "prepare_on": "gemelo mínimo (NF4 + DQ, CPU)",
        "twin_counts": twin_counts,
        "twin_adapter": {"file_bytes": 4 * twin_counts["peft_trainable"] + 52_552,
                         "tensor_bytes": 4 * twin_counts["peft_trainable"]},
        "gpu": gpu, "trainable_search": lora.search_lora_counts(83_886_080),
        "total_search": lora.search_total_counts(3_213_004_800),
    }).set_index("afirmación")


def test_claims_table_is_computed_from_the_measurements(twin_peft, prepare_effects):
    measured = _claims(lora.count_parameters(twin_peft), prepare_effects)
    assert len(measured) == len(lora.ORIGINAL_CLAIMS)
    assert measured.loc["parámetros entrenables", "medido"] == "48.627.712"
    assert measured.loc["% entrenable", "medido"] == "1,491\xa0%"
    # "3 billones" is 3 × 10¹² in Spanish: the model has 3,21 mil millones
    assert measured.loc["parámetros del modelo base", "veredicto"] == "incorrecto"
    assert measured.loc["parámetros del modelo base", "medido"].startswith("3.212.749.824 = 3,21 mil millones")
    # "~6 GB": the bf16 weights measured on the GPU, 6,43 GB = 5,98 GiB
    assert measured.loc["tamaño del modelo completo", "veredicto"] == "correcto"
    assert "6,43\xa0GB" in measured.loc["tamaño del modelo completo", "medido"]
    assert "5,98\xa0GiB" in measured.loc["tamaño del modelo completo", "medido"]
    row = measured.loc["qué hace prepare_model_for_kbit_training"]
    assert row["veredicto"] == "incorrecto" and "embeddings y normas a fp32" in row["medido"]
    assert "0,74\xa0GiB en el gemelo" in row["medido"]  # 789.403.648 bytes measured on the H100
    assert measured.loc["parámetros entrenables", "veredicto"] == "incorrecto"
    assert "Llama-3.1-8B" in measured.loc["parámetros entrenables", "por qué"]
    # one rule for every size row (CLAIM_RULE): read in GB and in GiB; VRAM = peak reserved + the CUDA context
    qlora = measured.loc["VRAM con QLoRA"]
    assert qlora["veredicto"] == "correcto"  # 5,34 GiB reserved + 0,5 GiB = 5,84 GiB, inside 5–6 read in GiB
    assert "5,84\xa0GiB (6,27\xa0GB)" in qlora["medido"] and "0,5\xa0GiB de contexto CUDA" in qlora["medido"]
    assert "en GB son 6,27 (no cumple); en GiB, 5,84 (cumple)" in qlora["por qué"]
    assert qlora["valor medido"] == pytest.approx((5_731_516_416 + 0.5 * 1024**3) / 1e9)  # in GB, as claimed
    no_quant = measured.loc["VRAM sin cuantización"]
    assert no_quant["veredicto"] == "incorrecto"  # the step, 14,89 GiB with the context, is no "~12 GB" either way
    assert "pesos fp32 solos (12,85\xa0GB = 11,97\xa0GiB)" in no_quant["por qué"]
    assert "en GB son 15,99 (no cumple); en GiB, 14,89 (no cumple)" in no_quant["por qué"]
    assert "en GB son 6,43 (cumple); en GiB, 5,98 (cumple)" in measured.loc["tamaño del modelo completo", "por qué"]
    assert measured.loc["ahorro de memoria de 4 bits", "veredicto"] == "incorrecto"
    # feed the claimed numbers instead: the verdicts follow the input, they are not typed in
    claimed = {"peft_trainable": 83_886_080, "peft_all": 3_213_004_800, "numel_trainable": 0, "numel_all": 0,
               "unpacked_all": 0, "packed_4bit_tensors": 0}
    as_claimed = _claims(claimed, {**prepare_effects, "lora_tensors": 4, "upcast_kinds": ["norms"]})
    assert (as_claimed.loc[["parámetros entrenables", "parámetros totales", "% entrenable"], "veredicto"]
            == "correcto").all()
    assert as_claimed.loc["tamaño del adaptador", "veredicto"] == "incorrecto"  # 335.5 MB is not ~185 MB
    assert as_claimed.loc["qué hace prepare_model_for_kbit_training", "veredicto"] == "correcto"


def test_a_size_claim_is_correct_when_either_reading_fits():
    """The verdict rule: MB/GB read as written and as MiB/GiB, a range or a "~" tolerance, the same for every row."""
    vram = next(c for c in lora.ORIGINAL_CLAIMS if c["key"] == "vram_qlora_gb")
    assert lora._verdict(vram, 5.84 * 1024**3) == "correcto"  # 6,27 GB misses, 5,84 GiB fits
    assert lora._verdict(vram, 5.5e9) == "correcto"  # fits both ways
    assert lora._verdict(vram, 6.5 * 1024**3) == "incorrecto"  # 6,98 GB and 6,5 GiB: neither
    no_quant = next(c for c in lora.ORIGINAL_CLAIMS if c["key"] == "vram_no_quant_gb")
    assert lora._verdict(no_quant, 12_852_048_896) == "correcto"  # the fp32 weights alone would pass: 11,97 GiB
    assert "Regla del veredicto" in lora.CLAIM_RULE and "contexto CUDA" in lora.CLAIM_RULE


def test_claims_latex_export(twin_peft, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(tmp_path))
    path = lora_report.save_claims_latex(_claims(lora.count_parameters(twin_peft)).reset_index())
    text = path.read_text(encoding="utf-8")
    assert path.name == "03_claims.tex" and "\\begin{table}" in text and "48.627.712" in text
    assert "1,491" in text and "1.491" not in text  # es-AR: never read as 1491 %
    assert "Regla del veredicto" in text  # the notes state the one rule every row is judged by
    assert "$\\sim$185" in text and "textasciitilde" not in text
    assert sum(lora_report.CLAIM_WIDTHS) <= 1


def test_prepare_freezes_everything_upcasts_16_bit_tensors_and_turns_on_checkpointing(tiny_4bit, prepare_effects):
    """What prepare_model_for_kbit_training does, measured: not 'gradients for the adapters only'."""
    effects = prepare_effects
    assert effects["trainable_before"] > 0 and effects["trainable_after"] == 0
    assert effects["lora_tensors"] == 0  # no adapter exists yet when prepare runs
    assert effects["upcast_kinds"] == ["embedding", "norms"]  # not just the norms; 4-bit weights untouched
    counts = memory.analytic_parameter_counts(tiny_4bit.config)
    assert effects["upcast_params"] == counts["embedding"] + counts["norms"]
    assert effects["added_bytes"] == 2 * effects["upcast_params"]  # fp16 → fp32
    assert all(p.dtype == torch.float32 for n, p in tiny_4bit.named_parameters() if "norm" in n)
    assert not effects["checkpointing_before"] and effects["checkpointing_after"]
    assert not effects["input_hook_before"] and effects["input_hook_after"] and effects["input_grads_after"]
    table = prepare.prepare_table(effects)
    assert table.iloc[0].tolist()[1:] == [str(effects["trainable_before"]), "0"]
