"""Training on today's API: labels, BOS, the fp16 recast, the original's configuration, clear errors."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import nbformat
import pytest
import torch

from utils import training
from utils.config import ProfileError
from utils.data import DatasetError, completion_mask, load_records
from utils.inference import load_trained
from utils.paths import ADAPTER_DIR, CHECKPOINTS_DIR, NOTEBOOKS_DIR, PROGRESS_FILE, TENSORBOARD_DIR, TRAIN_FILE

from trainers import SMOKE, smoke_trainer  # tests/trainers.py


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return smoke_trainer(tmp_path_factory.mktemp("fixed"))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return smoke_trainer(tmp_path_factory.mktemp("original"), replicate_original=True)


def test_labels_mask_the_prompt_and_train_the_answer_and_its_eos(fixed):
    trainer, tokenizer, data, _ = fixed
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for index in range(len(data.train_records)):
        table = training.label_table(trainer, tokenizer, index)
        ids, mask = completion_mask(tokenizer, data.train_records[index]["messages"])
        assert table["id"].tolist() == ids  # the trainer tokenises exactly like the template
        assert table["con_pérdida"].tolist() == [bool(m) for m in mask]
        facts = training.describe_labels(table, tokenizer)
        assert facts["eos_final_con_pérdida"], "the EOS closing the answer must carry loss"
        answer = data.train_records[index]["messages"][-1]["content"]
        assert facts["texto_con_pérdida"].startswith(answer)
        assert facts["texto_con_pérdida"].rstrip("\n").endswith(tokenizer.eos_token)
        assert "Sos un asistente" in facts["texto_enmascarado"]  # the system prompt carries no loss


def test_embedded_examples_hold_only_the_templates_bos(fixed):
    trainer, tokenizer, _, _ = fixed
    # ChatML: <|im_start|> is SmolLM2's BOS and opens each of the three turns; nothing is prepended.
    assert training.expected_bos(tokenizer) is None
    assert not training.tokenizer_adds_bos(tokenizer)
    for ids in trainer.train_dataset["input_ids"]:
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 3


def test_llama_tokenizer_gives_one_bos_on_both_paths(llama_tokenizer):
    from datasets import Dataset

    from utils.data import to_text_dataset

    records = load_records(TRAIN_FILE)[:3]
    assert training.expected_bos(llama_tokenizer) == 1
    ids, _ = completion_mask(llama_tokenizer, records[0]["messages"])  # prompt-completion path
    assert ids.count(llama_tokenizer.bos_token_id) == 1
    text = to_text_dataset(records, llama_tokenizer)
    doubled = Dataset.from_dict({"input_ids": [llama_tokenizer(t)["input_ids"] for t in text["text"]]})
    assert training.bos_counts(doubled, llama_tokenizer) == [2, 2, 2]  # the original's trap
    with pytest.raises(training.TrainingConfigError, match="BOS"):
        training.check_bos(doubled, llama_tokenizer)
    stripped = training.strip_template_bos(text, llama_tokenizer)
    single = Dataset.from_dict({"input_ids": [llama_tokenizer(t)["input_ids"] for t in stripped["text"]]})
    assert training.bos_counts(single, llama_tokenizer) == [1, 1, 1]
    training.check_bos(single, llama_tokenizer)


def test_fp16_recast_puts_trainable_parameters_in_fp32(embedded_model):
    import copy

    from peft import get_peft_model

    from utils.modeling import build_lora_config

    model = get_peft_model(copy.deepcopy(embedded_model), build_lora_config())
    for param in model.parameters():  # what TRL does to the adapters of a 4-bit model
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    frozen.data = frozen.data.to(torch.bfloat16)
    assert set(training.trainable_dtypes(model)) == {"bf16"}
    changed = training.recast_trainable_parameters(model, torch.float32)
    assert changed > 0
    assert set(training.trainable_dtypes(model)) == {"fp32"}
    assert frozen.dtype == torch.bfloat16  # frozen weights are left alone


def test_fp16_plan_recasts_and_bf16_plan_does_not(tmp_path):
    fp16 = training.plan_training(
        training.TrainingSettings(compute_dtype="fp16", quantization="nf4_dq", output_dir=str(tmp_path)),
        device="cuda:0",
    )
    assert fp16.fp16 and not fp16.bf16 and fp16.recast_trainable_fp32
    assert fp16.optim == "paged_adamw_8bit"
    assert any("escalador de gradientes" in note for note in fp16.notes)


def test_cpu_uses_adamw_torch_and_says_so_once(tmp_path):
    plan = training.plan_training(training.TrainingSettings(output_dir=str(tmp_path)), device="cpu")
    assert plan.optim == "adamw_torch" and plan.quantization is None and plan.compute_dtype == "fp32"
    assert sum("adamw_torch" in note for note in plan.notes) == 1
    config = training.build_sft_config(training.TrainingSettings(output_dir=str(tmp_path)), plan)
    assert not config.fp16 and not config.bf16  # SFTConfig alone would turn bf16 on
    assert config.learning_rate == 1e-4 and config.max_length == 512  # not TRL's 2e-5 and 1024
    assert config.train_sampling_strategy == "random" and config.per_device_eval_batch_size == 1


def test_replicate_original_restores_pad_eos_and_full_text_loss(original):
    trainer, tokenizer, _, plan = original
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert plan.loss == "full_text" and trainer.args.train_sampling_strategy == "group_by_length"
    assert trainer.args.completion_only_loss is False
    table = training.label_table(trainer, tokenizer, 0)
    facts = training.describe_labels(table, tokenizer)
    assert "Sos un asistente" in facts["texto_con_pérdida"]  # the prompt carries loss
    # one EOS per turn (TRL appends one more to ChatML text, which ends in "\n"): all masked as pad, as before
    assert facts["eos_en_el_ejemplo"] >= 3 and facts["eos_con_pérdida"] == 0
    assert not facts["eos_final_con_pérdida"]
    assert facts["tokens_con_pérdida"] == facts["tokens"] - facts["eos_en_el_ejemplo"]


def test_a_dataset_that_fails_validation_stops_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "¿Hola?"}, {"role": "assistant", "content": "Sí."}]})
    bad.write_text(good + "\n" + '{"messages": [{"role": "user", "content": ""}]}\n', encoding="utf-8")
    code = training.main(["--profile", "smoke", "--train-file", str(bad), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and f"{bad}:2" in err
    assert not (tmp_path / "run" / ADAPTER_DIR).exists()
    with pytest.raises(DatasetError):
        settings = training.TrainingSettings(**{**SMOKE, "train_file": str(bad), "output_dir": str(tmp_path)})
        training.load_training_data(settings, training.plan_training(settings, "cpu"), None)


def test_a_memory_estimate_over_the_budget_stops_with_the_knobs(tmp_path):
    settings = training.TrainingSettings(**{**SMOKE, "memory_budget_gib": 0.5, "output_dir": str(tmp_path)})
    plan = training.plan_training(settings, device="cpu")
    with pytest.raises(training.TrainingConfigError) as info:
        training.check_memory(settings, plan)
    message = str(info.value)
    for knob in ("memory_budget_gib=0.5", "per_device_train_batch_size", "max_seq_length", "gradient_checkpointing"):
        assert knob in message
    # The thesis configuration (NF4 + DQ, fp16) fits the RTX 2070 SUPER's 8 GiB; fp32 weights do not.
    from utils.modeling import twin_config

    thesis = training.TrainingSettings(memory_budget_gib=8.0, output_dir=str(tmp_path))
    gpu = training.plan_training(training.TrainingSettings(compute_dtype="fp16", output_dir=str(tmp_path)), "cuda:0")
    gpu.quantization = "nf4_dq"
    assert training.check_memory(thesis, gpu, twin_config())["total_gib"] < 8.0
    gpu.quantization = "fp32"
    with pytest.raises(training.TrainingConfigError, match="GiB"):
        training.check_memory(thesis, gpu, twin_config())


def test_out_of_memory_during_training_is_reported_with_the_knobs(tmp_path):
    class OomTrainer:
        args = type("Args", (), {"to_dict": lambda self: {}})()

        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path)})
    plan = training.plan_training(settings, device="cpu")
    with pytest.raises(training.TrainingOutOfMemoryError) as info:
        training.run_training(OomTrainer(), settings, plan)
    for knob in ("per_device_train_batch_size=1", "gradient_accumulation_steps", "max_seq_length=512",
                 "gradient_checkpointing=False", "Tried to allocate"):
        assert knob in str(info.value)


@pytest.mark.parametrize("change, match", [
    (dict(warmup_steps=10, max_steps=5), "warmup_steps"),
    (dict(compute_dtype="fp16"), "needs a CUDA GPU"),
    (dict(quantization="nf5"), "quantization='nf5'"),
    (dict(max_seq_length=0), "max_seq_length"),
])
def test_bad_settings_fail_with_one_clear_message(tmp_path, change, match):
    with pytest.raises(training.TrainingConfigError, match=match):
        training.plan_training(training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), **change}), "cpu")


def test_resume_refuses_checkpoints_of_other_settings(tmp_path):
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path)})
    plan = training.plan_training(settings, "cpu")
    training.write_config(settings, plan)
    state = tmp_path / CHECKPOINTS_DIR / "checkpoint-2"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text("{}")
    (tmp_path / CHECKPOINTS_DIR / "checkpoint-4").mkdir()  # killed mid-write: no state file
    resumed = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), "resume": True})
    assert training.plan_training(resumed, "cpu").resume_from == str(state)
    other = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), "resume": True, "learning_rate": 3e-4})
    with pytest.raises(training.TrainingConfigError, match="learning_rate"):
        training.plan_training(other, "cpu")


def test_notebook_parameters_are_the_thesis_defaults():
    nb = nbformat.read(NOTEBOOKS_DIR / "04_training.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    defaults = training.TrainingSettings().to_dict()
    assert {k: values[k] for k in defaults} == defaults
    assert set(values) - set(defaults) == set(training.NOTEBOOK_ONLY)


def test_profiles_set_only_known_settings(tmp_path):
    for profile in ("smoke", "demo", "thesis"):
        settings = training.profile_settings(profile, output_dir=str(tmp_path / profile))  # not runs/<profile>
        training.plan_training(settings, "cpu")  # valid on this machine
    demo = training.profile_settings("demo")
    # The demo recipe chosen on validation (results/04_recipe_sweep_cpu.json): lr 1e-3, effective batch 4.
    assert demo.model_name == "embedded" and demo.gradient_accumulation_steps * demo.per_device_train_batch_size == 4
    assert demo.learning_rate == 1e-3
    assert training.profile_settings("thesis") == training.TrainingSettings(profile="thesis")


def test_fast_path_is_the_gpu_default_and_keeps_the_recipe(tmp_path):
    """auto: on for a CUDA GPU (1 x 2 becomes one padding-free micro-batch of 2), off on the CPU and for the original."""
    gpu = training.plan_training(
        training.TrainingSettings(compute_dtype="fp16", quantization="nf4_dq", output_dir=str(tmp_path)), "cuda:0")
    assert gpu.fast_path and (gpu.per_device_train_batch_size, gpu.gradient_accumulation_steps) == (2, 1)
    config = training.build_sft_config(training.TrainingSettings(output_dir=str(tmp_path)), gpu)
    assert config.per_device_train_batch_size == 2 and config.gradient_accumulation_steps == 1
    original = training.plan_training(training.TrainingSettings(
        compute_dtype="fp16", quantization="nf4_dq", replicate_original=True, output_dir=str(tmp_path)), "cuda:0")
    assert not original.fast_path and original.kbit_upcast
    assert (original.per_device_train_batch_size, original.gradient_accumulation_steps) == (1, 2)
    assert not training.plan_training(training.TrainingSettings(output_dir=str(tmp_path)), "cpu").fast_path
    with pytest.raises(training.TrainingConfigError, match="fast_path='on' but replicate_original"):
        training.plan_training(training.TrainingSettings(fast_path="on", replicate_original=True,
                                                         output_dir=str(tmp_path)), "cpu")
    with pytest.raises(training.TrainingConfigError, match="fast_path='maybe'"):
        training.plan_training(training.TrainingSettings(fast_path="maybe", output_dir=str(tmp_path)), "cpu")


@pytest.mark.slow
def test_fast_path_trains_like_the_standard_forward(tmp_path):
    """Two steps through SFTTrainer with each forward: the same losses (up to LoRA-dropout masks), an adapter."""
    results = {}
    for mode in ("off", "on"):
        settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path / mode), "fast_path": mode,
                                                "eval_steps": 2, "logging_steps": 1})
        results[mode] = training.train(settings, verbose=False)
    assert results["on"]["global_step"] == results["off"]["global_step"] == 2
    for key in ("first_train_loss", "last_train_loss", "last_eval_loss"):
        assert results["on"][key] == pytest.approx(results["off"][key], abs=0.02), key
    assert results["on"]["tokens_trained"] == results["off"]["tokens_trained"]  # padding-free counts real tokens
    model, _ = load_trained(tmp_path / "on")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_model_the_fast_path_cannot_run_falls_back_or_fails_clearly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    auto = training.plan_training(training.TrainingSettings(
        compute_dtype="fp16", quantization="nf4_dq", output_dir=str(tmp_path)), "cuda:0")
    training.check_fast_path_model(training.TrainingSettings(output_dir=str(tmp_path)), auto, gpt2)
    assert not auto.fast_path and (auto.per_device_train_batch_size, auto.gradient_accumulation_steps) == (1, 2)
    assert any("queda apagado" in note and "gpt2" in note for note in auto.notes)
    on = training.TrainingSettings(fast_path="on", output_dir=str(tmp_path))
    plan = training.plan_training(on, "cpu")
    with pytest.raises(training.TrainingConfigError, match="model_type 'llama'"):
        training.check_fast_path_model(on, plan, gpt2)


def test_fast_path_trainer_updates_all_lora_tensors_in_one_optimizer_call(tmp_path):
    """paged AdamW 8-bit under the fast path: one flat buffer, the library's own hyperparameters, and it trains."""
    from utils.speed.optim import FlatOptimizer

    trainer, _, _, plan = smoke_trainer(tmp_path, fast_path="on", max_steps=1, warmup_steps=0, eval_steps=10)
    trainer.args.optim = plan.optim = "paged_adamw_8bit"  # the CUDA default; bitsandbytes also runs it on the CPU
    assert training.use_flat_optimizer(trainer, plan)
    reference_cls, reference_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, FlatOptimizer) and isinstance(optimizer.inner, reference_cls)
    inner = optimizer.inner.param_groups[0]
    assert all(inner[k] == v for k, v in reference_kwargs.items() if k in inner)
    lora = [p for p in trainer.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in lora) == sum(flat.numel() for _, flat in optimizer.flats)
    before = [p.detach().clone() for p in lora]
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))  # the update reached the LoRA tensors


def _write_profile(params_dir: Path, monkeypatch, text: str) -> Path:
    """A profile YAML in a temporary profiles folder that ``utils.config`` reads from."""
    monkeypatch.setattr("utils.config.PARAMS_DIR", params_dir)
    path = params_dir / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_common_max_seq_length_reaches_the_training_settings(tmp_path, monkeypatch):
    """The sequence length has one name: set once in ``common``, notebook 04 and the CLI train with it."""
    _write_profile(tmp_path, monkeypatch, "common:\n  model_name: embedded\n  max_seq_length: 128\n"
                                          "notebooks:\n  \"04\":\n    max_steps: 3\n    warmup_steps: 1\n    stop_examples: 2\n")
    settings = training.profile_settings("mine")
    assert settings.max_seq_length == 128 and settings.max_steps == 3 and settings.model_name == "embedded"
    assert training.profile_settings("mine", max_seq_length=64).max_seq_length == 64  # a CLI flag wins
    plan = training.plan_training(settings, "cpu")
    assert training.build_sft_config(settings, plan).max_length == 128
    assert "--max-seq-length" in training.build_parser().format_help()


@pytest.mark.parametrize("block", ["common", "04"])
def test_a_misspelt_profile_key_names_the_key_the_file_and_the_known_names(tmp_path, monkeypatch, capsys, block):
    body = "  max_seq_lenght: 128\n" if block == "common" else "  \"04\":\n    max_seq_lenght: 128\n"
    text = f"common:\n{body}" if block == "common" else f"common:\n  model_name: embedded\nnotebooks:\n{body}"
    path = _write_profile(tmp_path, monkeypatch, text)
    with pytest.raises(ProfileError) as info:
        training.profile_settings("mine")
    message = str(info.value)
    assert "max_seq_lenght" in message and str(path) in message and "max_seq_length" in message
    assert training.main(["--profile", "mine", "--output-dir", str(tmp_path / "run")]) == 2
    assert "max_seq_lenght" in capsys.readouterr().err


def test_the_run_config_is_written_from_the_lora_and_sft_configs(tmp_path):
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), "max_seq_length": 256})
    plan = training.plan_training(settings, "cpu")
    config = json.loads(training.write_config(settings, plan).read_text(encoding="utf-8"))
    lora = training.build_training_lora_config(settings)
    assert config["lora"]["r"] == lora.r and config["lora"]["lora_alpha"] == lora.lora_alpha
    assert config["lora"]["target_modules"] == sorted(lora.target_modules)
    assert set(config["lora"]) == set(lora.to_dict())  # every field of the object, none copied by hand
    sft = training.build_sft_config(settings, plan)
    assert set(config["sft_config"]) == set(sft.to_dict())
    assert config["sft_config"]["max_length"] == 256 and config["parameters"]["max_seq_length"] == 256
    # what notebook 05 and utils.inference read back
    assert config["model_name"] == "embedded" and config["quantization"] is None
    assert config["compute_dtype"] == "fp32" and config["replicate_original"] is False
    assert config["commit"] and config["command"]


# --------------------------------------------------------------------------------------------
# Validation: every evaluation during training, kept apart from train and from test
# --------------------------------------------------------------------------------------------

FIXED_LOSS = types.SimpleNamespace(loss="completion_only")  # the part of TrainingPlan the data loading reads


def _chat(question: str, answer: str, record_id: str) -> dict:
    return {"id": record_id, "messages": [{"role": "system", "content": "Sos un asistente de la UTN."},
                                          {"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}]}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_training_evaluates_on_validation_kept_apart_from_train_and_test(tmp_path, monkeypatch, embedded_tokenizer):
    train = [_chat("¿Qué ordenanza rige el grado?", "La Ord. 1549.", "a"), _chat("¿Quién aprueba?", "El CS.", "b")]
    validation = [_chat("¿Cuál es la norma del grado?", "La Ord. 1549.", "v1")]
    files = {"train": _jsonl(tmp_path / "train.jsonl", train), "validation": _jsonl(tmp_path / "val.jsonl", validation),
             "test": _jsonl(tmp_path / "test.jsonl", [_chat("¿Qué norma aplica al grado?", "Ord. 1549.", "t1")])}
    monkeypatch.setattr("utils.training.data.TEST_FILE", files["test"])

    def load(**change):
        settings = training.TrainingSettings(**{"profile": "smoke", "model_name": "embedded",
                                                "output_dir": str(tmp_path / "run"), "train_file": str(files["train"]),
                                                "validation_file": str(files["validation"]), **change})
        return training.load_training_data(settings, FIXED_LOSS, embedded_tokenizer)

    data = load()
    assert [r["id"] for r in data.validation_records] == ["v1"] and len(data.eval) == 1
    stop = training.TrainingSettings(validation_file=str(files["validation"]))
    assert [r["id"] for r in training.stop_rate_records(stop, 0)] == ["v1"]  # the stop rate is measured on validation
    _jsonl(files["validation"], validation + [_chat("¿que ORDENANZA rige el grado", "Esa.", "v-leak")])
    with pytest.raises(DatasetError, match=r"leaked ids: v-leak \(1\)") as info:
        load()
    assert "allow_split_overlap" in str(info.value)
    assert any("v-leak" in n and "allow_split_overlap=True" in n for n in load(allow_split_overlap=True).notes)
    (tmp_path / "alias.jsonl").symlink_to(files["train"])
    with pytest.raises(DatasetError, match="train_file and validation_file are the same file"):
        load(validation_file=str(tmp_path / "alias.jsonl"))
    with pytest.raises(DatasetError, match="validation_file is the test split"):  # never allowed
        load(validation_file=str(files["test"]), allow_split_overlap=True)
    _jsonl(files["validation"], validation + [_chat("¿Qué norma aplica al grado?", "Otra.", "v-test")])
    with pytest.raises(DatasetError, match=r"test split.*leaked ids: t1"):
        load()
    assert any("t1" in n for n in load(allow_split_overlap=True).notes)


def test_sft_config_early_stopping_tensorboard_and_no_pinned_memory_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr("utils.training.settings.is_tensorboard_available", lambda: True)
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), "early_stopping_patience": 2,
                                            "eval_steps": 2, "save_steps": 2})
    plan = training.plan_training(settings, "cpu")
    assert plan.tensorboard_dir == str(tmp_path / TENSORBOARD_DIR)
    config = training.build_sft_config(settings, plan)
    assert config.load_best_model_at_end and config.metric_for_best_model == "eval_loss"
    assert config.greater_is_better is False and config.report_to == ["tensorboard"]
    assert config.dataloader_pin_memory is False  # torch warns that pinned memory is ignored without a GPU
    assert config.disable_tqdm  # stderr is not a terminal here (pytest captures it): no raw progress bar
    plain = training.build_sft_config(training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path)}), plan)
    assert not plain.load_best_model_at_end and plain.metric_for_best_model is None
    monkeypatch.setattr("utils.training.settings.is_tensorboard_available", lambda: False)
    without = training.plan_training(settings, "cpu")
    assert without.tensorboard_dir is None and training.build_sft_config(settings, without).report_to == []
    assert sum("TensorBoard no está instalado" in note for note in without.notes) == 1


@pytest.mark.slow
def test_a_short_run_stops_early_keeps_the_best_adapter_and_logs_progress_and_tensorboard(tmp_path):
    """Early stopping on validation: the best checkpoint is the saved adapter; progress file and TensorBoard events."""
    pytest.importorskip("tensorboard")
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "campaign" / "validation_2000"
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(run), "max_steps": 5, "warmup_steps": 0,
                                            "eval_limit": 1, "learning_rate": 0.9, "eval_steps": 1, "save_steps": 1,
                                            "save_total_limit": 2, "early_stopping_patience": 1,
                                            "logging_steps": 1, "eval_on_start": False})
    result = training.train(settings, verbose=False)
    assert result["stopped_early"] and result["global_step"] < 5
    best = result["adapter_step"]
    assert best == result["best_eval_step"] < result["global_step"]
    kept = {p.name for p in (run / CHECKPOINTS_DIR).glob("checkpoint-*")}
    assert kept == {f"checkpoint-{best}", f"checkpoint-{result['global_step']}"}  # the best and the last
    saved = load_file(run / ADAPTER_DIR / "adapter_model.safetensors")
    at_best = load_file(run / CHECKPOINTS_DIR / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert json.loads((run / PROGRESS_FILE).read_text()) == {"step": result["global_step"], "max_steps": 5}
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("eval/loss")) == result["global_step"]
    assert not (run / CHECKPOINTS_DIR / "runs").exists()  # not transformers' default folder
    _check_campaign_summary(tmp_path / "campaign", result)


def _check_campaign_summary(folder: Path, result: dict) -> None:
    """The finished run copied as the campaign's three runs: one strict-JSON summary with provenance, and figures."""
    import shutil

    from utils.plotting import check_print_standard, set_figure_context
    from utils.plotting.training import plot_campaign_sampler, plot_campaign_validation
    from utils.reports.training import describe_campaign

    for name in ("random", "group_by_length"):
        shutil.copytree(folder / "validation_2000", folder / name)
    out = folder.parent / "04_gpu_campaign.json"
    assert training.main(["summarize-campaign", str(folder), "--out", str(out)]) == 0
    summary = json.loads(out.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert set(summary["runs"]) == set(training.CAMPAIGN_RUNS)
    run = summary["runs"]["validation_2000"]
    assert run["training"]["global_step"] == result["global_step"] and run["settings"]["max_steps"] == result["max_steps"]
    assert run["command"] and run["commit"] and run["versions"]["transformers"] and summary["device_name"]
    steps = [row["step"] for row in run["history"] if row.get("eval_loss") is not None]
    assert steps == list(range(1, result["global_step"] + 1))
    set_figure_context("embedded", "smoke")
    for fig in (plot_campaign_validation(run), plot_campaign_sampler(summary["runs"])):
        assert check_print_standard(fig, "campaign") >= 8
    assert "medido en GPU" in describe_campaign(summary)
    (folder / "crashed").mkdir()
    (folder / "crashed" / "04_config.json").write_text("{}")
    with pytest.raises(training.campaign.CampaignError, match="crashed"):
        training.summarize_campaign(folder, out)


# --------------------------------------------------------------------------------------------
# The time estimate for the RTX 2070 SUPER (utils.training.estimate)
# --------------------------------------------------------------------------------------------


def test_turing_peak_follows_the_whitepaper():
    from utils.training import estimate

    # the whitepaper's RTX 2080 Ti (68 SM, 1545 MHz): 107.6 TFLOPS fp16 accumulate, 53.8 fp32 accumulate
    assert estimate.turing_tensor_tflops(68, 1545, fp32_accumulate=False) == pytest.approx(107.6, abs=0.05)
    assert estimate.turing_tensor_tflops(68, 1545) == pytest.approx(53.8, abs=0.05)
    assert estimate.RTX_2070_SUPER.tensor_tflops == pytest.approx(40 * 1024 * 1770e6 / 2 / 1e12)  # 36.2


def test_work_per_step_and_hours_add_up():
    from utils.modeling import twin_config
    from utils.training import estimate

    config = twin_config()
    layers = 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192  # q, o; k, v; gate, up, down
    assert sum(estimate.projection_parameters(config).values()) == layers
    assert estimate.lora_parameters(config) == 48_627_712  # PEFT's count of the thesis LoRA
    original = estimate.flops_per_token(config, estimate.ORIGINAL, context_tokens=0)
    fast = estimate.flops_per_token(config, estimate.FAST_PATH, context_tokens=0)
    assert original["forward"] == original["backward"] == 2 * (28 * layers + 3072 * 128256)
    assert original["recompute"] == 2 * 28 * layers and fast["recompute"] == 2 * 28 * 2 * 3072 * 8192
    assert original["attention"] == 0 and original["lora"] == 2 * 48_627_712 * 4
    assert estimate.dequant_bytes_per_step(config, estimate.ORIGINAL) == 2 * 3 * 28 * layers * 4.5
    assert estimate.dequant_bytes_per_step(config, estimate.FAST_PATH) == (2 * 28 * layers + 28 * 2 * 3072 * 8192) * 4.5
    peak = estimate.RTX_2070_SUPER
    assert estimate.gpu_seconds(peak.tensor_tflops * 1e12 / 2, peak.memory_gb_s * 1e9, peak, 0.5) == pytest.approx(2.0)
    assert estimate.step_seconds(0.3, 1.0) == 1.0 and estimate.hours_for(2000, 1.8) == pytest.approx(1.0)


def test_the_estimate_takes_the_host_floor_and_the_measured_utilisation(tmp_path):
    from utils.modeling import twin_config
    from utils.training import estimate

    config = twin_config()
    fast_work = 16_000 * estimate.flops_per_token(config, estimate.FAST_PATH, 250)["total"]
    fast_seconds = fast_work / (0.4 * estimate.H200.tensor_tflops * 1e12) + estimate.dequant_bytes_per_step(
        config, estimate.FAST_PATH) / (estimate.H200.memory_gb_s * 1e9)
    report = {"rows": [
        {"name": "original_corpus_fp16", "seconds_per_step": 5.0, "tokens_per_step": 400, "micro_batch": 1},
        {"name": "fast_2x1_corpus_fp16", "seconds_per_step": 0.01, "tokens_per_step": 400, "micro_batch": 2},
        {"name": "fast_mb32_corpus_bf16", "seconds_per_step": fast_seconds, "tokens_per_step": 16_000, "micro_batch": 32},
    ]}
    assert estimate.measured_utilisation(report["rows"][2], config, estimate.FAST_PATH, estimate.H200) == pytest.approx(0.4)
    rows = {(r["recipe"], r["workload"]): r for r in estimate.estimate_hours(config, [200, 300], [report])}
    original, fast = rows[("original", "corpus")], rows[("fast_path", "corpus")]
    assert original["tokens_per_step"] == 500 and original["utilisation_high"] == pytest.approx(0.4)
    assert original["step_s_low"] == original["step_s_high"] == 5.0  # the host floor dominates
    assert original["hours_high"] == pytest.approx(2000 * 5.0 / 3600)
    assert fast["step_s_high"] == pytest.approx(fast["gpu_s_high"]) and fast["gpu_s_high"] > 0.01  # GPU-bound
    assert rows[("original", "max_length")]["tokens_per_step"] == 1024
