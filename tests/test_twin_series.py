"""The Llama-3.2-3B twin as a normal local model (materialised once, loaded in any format) and the 8 GB GPU cap.

Everything runs on a CPU with the 2-layer tiny twin: the full twin is 6.4 GB and is only written on a GPU machine.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from utils import memory, modeling
from utils.config import load_profile
from utils.memory import budget
from utils.modeling import TWIN, ModelNotAvailableError, materialize_twin, tiny_twin_config
from utils.paths import REPO_ROOT
from utils.units import GIB

GPU_REPORT = REPO_ROOT / "results" / "02_twin_gpu_memory.json"


@pytest.fixture(scope="module")
def tiny_twin(tmp_path_factory):
    """A materialised tiny twin (bf16 safetensors, config, generation config, Llama-3.2 tokenizer)."""
    return materialize_twin(tmp_path_factory.mktemp("cache") / "twin", config=tiny_twin_config())


@pytest.fixture
def twin_is_tiny(monkeypatch, tiny_twin):
    """``llama-3.2-3b-twin`` resolves to the tiny twin's folder (as it would to the 6.4 GB one on a GPU machine)."""
    monkeypatch.setattr(modeling, "materialize_twin", lambda *a, **k: tiny_twin)
    return tiny_twin


def test_materialized_twin_is_a_complete_local_model(tiny_twin):
    names = {p.name for p in tiny_twin.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            modeling.TWIN_MARKER} <= names
    assert not list(tiny_twin.parent.glob("twin.tmp*")), "the temporary folder was left behind"
    tokenizer = modeling.load_tokenizer(str(tiny_twin))
    assert tokenizer.eos_token == modeling.LLAMA_EOT_TOKEN and tokenizer.pad_token == modeling.LLAMA_PAD_TOKEN


def test_second_materialization_reuses_the_folder(tiny_twin):
    before = (tiny_twin / "model.safetensors").stat().st_mtime_ns
    assert materialize_twin(tiny_twin, config=tiny_twin_config()) == tiny_twin
    assert (tiny_twin / "model.safetensors").stat().st_mtime_ns == before


def test_same_seed_same_weights_other_seed_other_weights(tiny_twin, tmp_path):
    from safetensors.torch import load_file

    again = load_file(materialize_twin(tmp_path / "a", config=tiny_twin_config()) / "model.safetensors")
    other = load_file(materialize_twin(tmp_path / "b", seed=1, config=tiny_twin_config()) / "model.safetensors")
    first = load_file(tiny_twin / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    assert first[name].dtype == torch.bfloat16


def test_twin_loads_by_name_in_fp32(twin_is_tiny):
    model = modeling.load_model(TWIN, quantization="fp32", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == tiny_twin_config().num_hidden_layers
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, tiny_twin_config().vocab_size) and torch.isfinite(logits).all()


def test_twin_loads_by_name_in_nf4_dq(twin_is_tiny):
    try:
        model = modeling.load_model(TWIN, quantization="nf4_dq", device="cpu")
    except Exception as exc:  # a bitsandbytes without the CPU backend
        pytest.skip(f"bitsandbytes cannot quantise on this CPU: {type(exc).__name__}: {exc}")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(modeling, "load_tokenizer", lambda name: BrokenTokenizer())
    with pytest.raises(RuntimeError, match="simulated"):
        materialize_twin(tmp_path / "twin", config=tiny_twin_config())
    assert list(tmp_path.iterdir()) == [], "a half-written twin or its temporary folder was left behind"


def test_a_user_folder_is_never_overwritten(tmp_path):
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "notes.txt").write_text("mine")
    with pytest.raises(ModelNotAvailableError, match="not a twin folder"):
        materialize_twin(tmp_path / "twin", config=tiny_twin_config())
    assert (tmp_path / "twin" / "notes.txt").read_text() == "mine"


def test_full_twin_needs_free_disk_and_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(modeling.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * 10**9))
    with pytest.raises(ModelNotAvailableError, match="QLORA_CACHE_DIR") as info:
        materialize_twin(tmp_path / "twin")  # the 3B config: refused before any weight is drawn
    assert "16 GB" in str(info.value)
    assert not (tmp_path / "twin").exists()


def test_twin_quantized_cache_is_named_after_the_twin():
    assert memory.quantized_cache_folder(TWIN, "nf4_dq").name == "llama-3.2-3b-twin-nf4_dq-cpu"


def test_notebooks_fall_back_to_the_meta_twin_without_disk(monkeypatch):
    def no_room(name):
        raise ModelNotAvailableError("the twin needs 16 GB free disk (simulated)")

    monkeypatch.setattr("utils.memory.live.model_folder", no_room)
    live = memory.resolve_live_model(TWIN, "02", GPU_REPORT)
    assert not live.available and "simulated" in live.note


def test_twin_is_live_once_materialized(twin_is_tiny):
    live = memory.resolve_live_model(TWIN, "03", GPU_REPORT)
    assert live.available and live.weights_name == TWIN


def test_gpu_cap_is_a_no_op_on_a_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(budget.CAP_ENV, raising=False)
    assert memory.cap_gpu_memory(8.0) == {"applied": False, "card_gib": 8.0, "reason": "sin CUDA"}
    assert "no limita" in capsys.readouterr().out
    assert budget.CAP_ENV not in os.environ
    assert memory.peak_gpu_memory() == {}
    assert memory.apply_gpu_memory_cap_from_env() is None


def test_gpu_cap_zero_is_refused():
    with pytest.raises(ValueError, match="gpu_memory_cap_gib"):
        memory.cap_gpu_memory(0.0)


@pytest.fixture
def fake_h200(monkeypatch):
    """torch.cuda of an 80 GiB GPU whose context measures 0.4 GiB; records the fraction set."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.update(fraction=fraction))
    monkeypatch.setattr(budget, "measure_cuda_context", lambda device: (int(0.4 * GIB), "simulated"))
    monkeypatch.delenv(budget.CAP_ENV, raising=False)
    return calls


def test_gpu_cap_leaves_the_card_minus_context_and_display(fake_h200):
    parts = memory.cap_gpu_memory(8.0)
    expected = 8.0 - 0.4 - budget.WINDOWS_DISPLAY_RESERVE_GIB
    assert parts["applied"] and parts["allocator_budget_gib"] == pytest.approx(expected, abs=1e-3)
    assert fake_h200["fraction"] == pytest.approx(expected / 80, rel=1e-6)
    assert float(os.environ[budget.CAP_ENV]) == pytest.approx(expected, abs=1e-5)
    fake_h200.clear()
    assert memory.apply_gpu_memory_cap_from_env() == pytest.approx(expected, abs=1e-5)  # what a child applies
    assert fake_h200["fraction"] == pytest.approx(expected / 80, rel=1e-5)
    os.environ.pop(budget.CAP_ENV)


def test_gpu_cap_cannot_model_a_bigger_card(fake_h200):
    with pytest.raises(ValueError, match="smaller card"):
        memory.cap_gpu_memory(96.0)
    assert "fraction" not in fake_h200


def test_thesis_twin_profile_caps_every_notebook_at_8_gib():
    profile = load_profile("thesis-twin")
    assert profile["common"]["model_name"] == TWIN and profile["common"]["gpu_memory_cap_gib"] == 8.0
    assert "fp32" not in profile["notebooks"]["02"]["formats"]  # 12 GiB of weights cannot fit an 8 GiB card
