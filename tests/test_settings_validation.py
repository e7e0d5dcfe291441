"""Every training setting is checked before a model loads: one error naming the setting, its value and the range.

Profile values and notebook parameters are converted to the declared type first (YAML 1.1 reads ``1e-4`` as text).
"""

from __future__ import annotations

import pytest

from utils import runner, training
from utils.config import ProfileError

SMOKE = dict(profile="smoke", model_name="embedded", train_limit=4, eval_limit=2, max_steps=2, warmup_steps=1,
             gradient_checkpointing=False)


@pytest.mark.parametrize("change, expected", [
    (dict(lora_alpha=0), ["lora_alpha=0", "above 0"]),
    (dict(lora_dropout=1.0), ["lora_dropout=1.0", "[0, 1)"]),
    (dict(lora_dropout=1.5), ["lora_dropout=1.5", "[0, 1)"]),
    (dict(lora_dropout=-0.1), ["lora_dropout=-0.1", "[0, 1)"]),
    (dict(lora_r=0), ["lora_r=0", "1 or more"]),
    (dict(warmup_steps=-1), ["warmup_steps=-1", "0 or more"]),
    (dict(eval_limit=-1), ["eval_limit=-1", "0 or more"]),
    (dict(train_limit=-3), ["train_limit=-3", "0 or more"]),
    (dict(max_steps=0, warmup_steps=0), ["max_steps=0", "1 or more"]),
    (dict(learning_rate=0.0), ["learning_rate=0.0", "(0, 1)"]),
    (dict(learning_rate=-1e-4), ["learning_rate=-0.0001", "(0, 1)"]),
    (dict(per_device_train_batch_size=0), ["per_device_train_batch_size=0", "1 or more"]),
    (dict(per_device_eval_batch_size=0), ["per_device_eval_batch_size=0", "1 or more"]),
    (dict(gradient_accumulation_steps=0), ["gradient_accumulation_steps=0", "1 or more"]),
    (dict(max_grad_norm=0.0), ["max_grad_norm=0.0", "above 0"]),
    (dict(save_steps=0), ["save_steps=0", "1 or more"]),
    (dict(eval_steps=0), ["eval_steps=0", "1 or more"]),
    (dict(logging_steps=0), ["logging_steps=0", "1 or more"]),
    (dict(save_total_limit=0), ["save_total_limit=0", "1 or more"]),
    (dict(weight_decay=-0.01), ["weight_decay=-0.01", "0 or more"]),
    (dict(memory_budget_gib=-1.0), ["memory_budget_gib=-1.0", "0 or more"]),
    (dict(lr_scheduler_type="cosinus"), ["lr_scheduler_type='cosinus'", "cosine", "linear"]),
    (dict(optim="adamw_troch"), ["optim='adamw_troch'", "adamw_torch", "paged_adamw_8bit"]),
    (dict(quantization="nf5"), ["quantization='nf5'", "nf4_dq"]),
    (dict(compute_dtype="fp8"), ["compute_dtype='fp8'", "bf16"]),
    (dict(fast_path="maybe"), ["fast_path='maybe'", "auto, on, off"]),
    (dict(model_name=""), ["model_name=''"]),
    (dict(validation_file=""), ["validation_file=''"]),
    (dict(train_sampling_strategy="sorted"), ["train_sampling_strategy='sorted'", "group_by_length"]),
    (dict(early_stopping_patience=-1), ["early_stopping_patience=-1", "0 or more"]),
    (dict(early_stopping_patience=2, eval_steps=2, save_steps=3), ["save_steps=3", "multiple of eval_steps=2"]),
    (dict(early_stopping_patience=2, eval_steps=2, save_steps=2, save_total_limit=1),
     ["save_total_limit=1", "2 or more"]),
])
def test_a_setting_that_cannot_train_is_one_message_before_any_model_loads(tmp_path, change, expected):
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), **change})
    with pytest.raises(training.TrainingConfigError) as info:
        training.plan_training(settings, "cpu")
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message


def test_the_choices_are_the_libraries_own(tmp_path):
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(training.SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(training.OPTIMIZERS) == {o.value for o in OptimizerNames}
    for name in ("cosine", "linear", "constant_with_warmup"):
        training.plan_training(training.TrainingSettings(**{**SMOKE, "lr_scheduler_type": name,
                                                            "output_dir": str(tmp_path)}), "cpu")


def test_numbers_written_as_text_are_converted_by_type():
    settings = training.TrainingSettings.from_parameters(
        {"learning_rate": "1e-4", "max_steps": "10", "lora_dropout": "0.1", "memory_budget_gib": 8, "junk": 1})
    assert settings.learning_rate == 1e-4 and isinstance(settings.learning_rate, float)
    assert settings.max_steps == 10 and isinstance(settings.max_steps, int)
    assert settings.lora_dropout == 0.1 and settings.memory_budget_gib == 8.0


@pytest.mark.parametrize("params, expected", [
    ({"learning_rate": "abc"}, ["learning_rate='abc'", "number"]),
    ({"max_steps": 2.5}, ["max_steps=2.5", "integer"]),
    ({"max_steps": "ten"}, ["max_steps='ten'", "integer"]),
    ({"eval_on_start": "yes"}, ["eval_on_start='yes'", "true or false"]),
    ({"learning_rate": True}, ["learning_rate=True", "number"]),
    ({"learning_rate": "nan"}, ["learning_rate='nan'", "finite"]),
    ({"resume": "maybe"}, ["resume='maybe'", "'auto', True or False"]),
    ({"resume": 1}, ["resume=1", "'auto', True or False"]),
])
def test_a_value_of_the_wrong_type_names_the_setting(params, expected):
    with pytest.raises(training.TrainingConfigError) as info:
        training.TrainingSettings.from_parameters(params)
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_resume_defaults_to_auto_and_keeps_true_and_false():
    assert training.TrainingSettings().resume == "auto"
    assert training.TrainingSettings(resume=True).resume is True
    assert training.TrainingSettings(resume=False).resume is False
    parser = training.build_parser()
    assert parser.parse_args([]).resume is None  # the settings' default
    assert parser.parse_args(["--resume"]).resume is True
    assert parser.parse_args(["--no-resume"]).resume is False
    assert parser.parse_args(["--resume", "auto"]).resume == "auto"


def _write_profile(params_dir, monkeypatch, text: str):
    """A profile YAML in a temporary profiles folder that ``utils.config`` reads from."""
    monkeypatch.setattr("utils.config.PARAMS_DIR", params_dir)
    path = params_dir / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_yaml_1_1_number_as_text_trains_with_the_number(tmp_path, monkeypatch):
    # PyYAML reads 1e-4 (no dot) as the string "1e-4"
    _write_profile(tmp_path, monkeypatch, 'common:\n  model_name: embedded\n  max_seq_length: "128"\n'
                                          'notebooks:\n  "04":\n    learning_rate: 1e-4\n    max_steps: 3\n'
                                          '    warmup_steps: 1\n')
    settings = training.profile_settings("mine", output_dir=str(tmp_path / "run"))
    assert settings.learning_rate == 1e-4 and isinstance(settings.learning_rate, float)
    assert settings.max_seq_length == 128
    training.plan_training(settings, "cpu")
    profile = runner.check_profile_keys("mine", runner.load_profile("mine"))
    assert profile["notebooks"]["04"]["learning_rate"] == 1e-4 and profile["common"]["max_seq_length"] == 128


@pytest.mark.parametrize("block, body, expected", [
    ("notebooks.04", 'notebooks:\n  "04":\n    learning_rate: abc\n', ["learning_rate", "'abc'", "number"]),
    ("notebooks.04", 'notebooks:\n  "04":\n    max_steps: 2.5\n', ["max_steps", "2.5", "integer"]),
    ("notebooks.04", 'notebooks:\n  "04":\n    gradient_checkpointing: maybe\n', ["gradient_checkpointing",
                                                                                    "true or false"]),
    ("common", 'common:\n  max_seq_length: long\n', ["max_seq_length", "'long'", "integer"]),
])
def test_a_profile_value_that_does_not_convert_names_file_block_key_and_type(tmp_path, monkeypatch, capsys, block,
                                                                             body, expected):
    path = _write_profile(tmp_path, monkeypatch, body)
    with pytest.raises(ProfileError) as info:
        runner.check_profile_keys("mine", runner.load_profile("mine"))
    message = str(info.value)
    for part in [str(path), block, *expected]:
        assert part in message, message
    assert training.main(["--profile", "mine", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "Traceback" not in err


def test_a_bad_flag_value_is_one_line_from_the_command_line(tmp_path, capsys):
    code = training.main(["--profile", "smoke", "--lora-alpha", "0", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: lora_alpha=0") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded


def test_test_file_is_now_validation_file_with_one_message_everywhere(tmp_path, monkeypatch, capsys):
    """A notebook parameter, a flag or a profile key still named test_file: one message naming validation_file."""
    with pytest.raises(training.TrainingConfigError) as info:
        training.TrainingSettings.from_parameters({"test_file": "dataset/utn_sample_test.jsonl", "max_steps": 3})
    message = str(info.value)
    for part in ("test_file", "validation_file", "dataset/utn_sample_validation.jsonl", "notebook 05"):
        assert part in message, message
    code = training.main(["--profile", "smoke", "--test-file", "x.jsonl", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: test_file is no longer") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    _write_profile(tmp_path, monkeypatch, 'common:\n  model_name: embedded\nnotebooks:\n  "04":\n'
                                          '    test_file: dataset/utn_sample_test.jsonl\n')
    with pytest.raises(training.TrainingConfigError, match="validation_file"):
        training.profile_settings("mine")
    # in ``common`` it is notebook 05's (and 01-03's) parameter: training never receives it
    _write_profile(tmp_path, monkeypatch, 'common:\n  model_name: embedded\n  test_file: dataset/utn_sample_test.jsonl\n')
    settings = training.profile_settings("mine", output_dir=str(tmp_path / "run"))
    assert settings.validation_file == "dataset/utn_sample_validation.jsonl" and "test_file" not in settings.to_dict()


def test_sampling_defaults_to_the_original_only_when_replicating_it(tmp_path):
    def sampling(**change) -> str:
        settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), **change})
        return training.plan_training(settings, "cpu").train_sampling_strategy

    assert sampling() == "random" and sampling(replicate_original=True) == "group_by_length"
    assert sampling(train_sampling_strategy="group_by_length") == "group_by_length"
    assert sampling(replicate_original=True, train_sampling_strategy="random") == "random"
    assert "train_sampling_strategy" in training.RESUME_MUST_MATCH  # another batch order is another run
