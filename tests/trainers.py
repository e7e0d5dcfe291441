"""The smoke trainer the training tests share: built as notebook 04 builds it (embedded model, CPU)."""

from __future__ import annotations

from pathlib import Path

from utils import training

SMOKE = dict(profile="smoke", model_name="embedded", train_limit=4, eval_limit=2, max_steps=2, warmup_steps=1,
             gradient_checkpointing=False)


def smoke_trainer(tmp_path: Path, **overrides):
    """A smoke trainer (embedded model, CPU, nothing trained) and what it was built from."""
    settings = training.TrainingSettings(**{**SMOKE, "output_dir": str(tmp_path), **overrides})
    plan = training.plan_training(settings, device="cpu")
    tokenizer = training.load_training_tokenizer(settings, plan)
    data = training.load_training_data(settings, plan, tokenizer)
    model = training.load_training_model(settings, plan)
    trainer = training.build_trainer(settings, plan, model, tokenizer, data)
    return trainer, tokenizer, data, plan
