"""The model naming layer: embedded model, real Llama-3.2 tokenizer, twin, hub errors, QLoRA configs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from utils import device, modeling
from utils.config import HUB_MODEL_ID, THESIS


def test_embedded_model_generates_on_cpu(embedded_model, embedded_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = embedded_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = embedded_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = embedded_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_load_of_embedded_is_fast():
    # A fresh interpreter, as a new notebook kernel would be; the libraries' own import time
    # (torch, transformers) is not part of loading the model.
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "from utils.modeling import load_model, load_tokenizer; import time; t=time.perf_counter();"
        "load_tokenizer('embedded'); load_model('embedded', device='cpu');"
        "print(time.perf_counter()-t)"
    )
    modeling.prepare_embedded_model()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 5.0


def test_pad_token_is_not_eos(embedded_tokenizer, llama_tokenizer):
    for tok in (embedded_tokenizer, llama_tokenizer):
        assert tok.pad_token_id is not None
        assert tok.pad_token_id != tok.eos_token_id
    assert embedded_tokenizer.eos_token == "<|im_end|>"  # the token that ends a ChatML turn
    assert llama_tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert llama_tokenizer.eos_token == "<|eot_id|>"


def test_llama3_template_round_trips_with_one_bos(llama_tokenizer):
    messages = [
        {"role": "system", "content": "Sos un asistente."},
        {"role": "user", "content": "¿Cuántos capítulos tiene la Ord. 1549?"},
        {"role": "assistant", "content": "Según la Ord. 1549, tiene 10 capítulos."},
    ]
    text = llama_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "Cutting Knowledge Date" not in text
    ids = llama_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(llama_tokenizer.bos_token_id) == 1
    assert ids[-1] == llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert llama_tokenizer.decode(ids) == text


def test_twin_has_exact_llama_3_2_3b_parameter_count():
    twin = modeling.build_twin()  # meta device: shapes only, no memory
    assert sum(p.numel() for p in twin.parameters()) == 3_212_749_824
    assert next(twin.parameters()).device.type == "meta"


def test_hub_model_offline_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(modeling.ModelNotAvailableError) as info:
        modeling.load_model(HUB_MODEL_ID, device="cpu")
    message = str(info.value)
    assert HUB_MODEL_ID in message and "hf download" in message and "embedded" in message
    # One message, not a chain of hub errors underneath it.
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("name", ["no/such/thing", "./missing-folder", "bad name"])
def test_bad_model_names_are_rejected(name):
    with pytest.raises(modeling.ModelNotAvailableError, match="model"):
        modeling.resolve_model(name)


def test_bnb_and_lora_configs_follow_the_thesis():
    bnb = modeling.build_bnb_config("nf4_dq", torch.float16)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float16
    lora = modeling.build_lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 64, 0.05)
    assert set(lora.target_modules) == set(THESIS.target_modules)
    with pytest.raises(ValueError, match="quantization"):
        modeling.build_bnb_config("nf3")


def test_one_dtype_vocabulary():
    assert device.torch_dtype("fp16") == torch.float16 and device.dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        device.torch_dtype("float16")


def test_compute_dtype_on_cpu_is_fp32():
    assert device.pick_compute_dtype("cpu") == torch.float32


def test_turing_gpu_gets_fp16(monkeypatch):
    # The RTX 2070 SUPER reports compute capability 7.5: bf16 must not be chosen there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert device.pick_compute_dtype("cuda:0") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert device.pick_compute_dtype("cuda:0") == torch.bfloat16
