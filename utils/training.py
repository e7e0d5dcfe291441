"""QLoRA training of the original script on today's API (TRL 1.x, transformers 5.x), with its traps fixed.

The notebook ``04_training.ipynb`` calls these functions one step per cell; the command line runs the same
functions in the same order (also under ``accelerate launch``)::

    python -m utils.training --profile demo                      # the profile's "04" parameters
    python -m utils.training --profile smoke --max-steps 6 --save-steps 2 --output-dir /tmp/run
    python -m utils.training --profile smoke --output-dir /tmp/run --resume  # continue after a crash
    python -m utils.training --model embedded --max-steps 5 --compute-dtype fp16 --quantization nf4_dq

Everything a run writes goes to ``runs/<profile>/`` (or ``--output-dir``): ``04_checkpoints/checkpoint-N/``,
``04_adapter/`` (adapter safetensors + tokenizer), ``04_config.json``, ``04_log_history.csv``, ``04_run.json``.
``load_trained(run_dir)`` loads the base model the way training did and puts the adapter on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.config import HUB_MODEL_ID, THESIS, load_profile, notebook_parameters
from utils.modeling import DTYPES
from utils.paths import resolve_path, run_dir

NOTEBOOK = "04"
CHECKPOINTS_DIR = "04_checkpoints"
ADAPTER_DIR = "04_adapter"
CONFIG_FILE = "04_config.json"
HISTORY_FILE = "04_log_history.csv"
RUN_FILE = "04_run.json"

QUANTIZATION_CHOICES = ("auto", "none", "fp32", "fp16", "bf16", "int8", "fp4", "nf4", "nf4_dq")
BNB_QUANTIZATIONS = ("int8", "fp4", "nf4", "nf4_dq")
FAST_PATH_CHOICES = ("auto", "on", "off")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Parameters of notebook 04 that are not training settings (the stop-rate measurement after training).
NOTEBOOK_ONLY = ("stop_examples", "stop_max_new_tokens")

# Settings a resumed run must share with the run that wrote the checkpoint: they change the maths.
RESUME_MUST_MATCH = (
    "model_name", "quantization", "compute_dtype", "train_file", "train_limit", "max_length", "lora_r",
    "lora_alpha", "lora_dropout", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "lr_scheduler_type",
    "optim", "replicate_original", "seed",
)


class TrainingConfigError(ValueError):
    """A training configuration that cannot run; the message names the setting and the fix."""


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of memory; the message lists the knobs that lower the peak."""


# --------------------------------------------------------------------------------------------
# Settings: the notebook's parameters, and what they resolve to on this machine
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingSettings:
    """The parameters of notebook 04. Defaults = the original ``train_peft_v3.py`` (the thesis run)."""

    profile: str = "thesis"
    model_name: str = HUB_MODEL_ID
    quantization: str = "auto"  # "auto": nf4_dq on CUDA, none (fp32) on the CPU
    compute_dtype: str = "auto"  # "auto": bf16 from compute capability 8.0, fp16 below, fp32 on the CPU
    train_file: str = "dataset/train_v3_combined_split.jsonl"
    test_file: str = "dataset/test_v3_combined_split.jsonl"
    train_limit: int = 0  # 0 = every training example
    eval_limit: int = 0  # 0 = every test example
    max_length: int = THESIS.max_seq_length
    lora_r: int = THESIS.lora_r
    lora_alpha: int = THESIS.lora_alpha
    lora_dropout: float = THESIS.lora_dropout
    per_device_train_batch_size: int = THESIS.per_device_train_batch_size
    gradient_accumulation_steps: int = THESIS.gradient_accumulation_steps
    learning_rate: float = THESIS.learning_rate
    max_steps: int = THESIS.max_steps
    warmup_steps: int = THESIS.warmup_steps
    weight_decay: float = THESIS.weight_decay
    max_grad_norm: float = THESIS.max_grad_norm
    lr_scheduler_type: str = THESIS.lr_scheduler_type
    optim: str = THESIS.optim
    per_device_eval_batch_size: int = 1
    eval_steps: int = THESIS.eval_steps
    eval_on_start: bool = True
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 3
    gradient_checkpointing: bool = True
    fast_path: str = "auto"  # "auto": utils.fastpath on a CUDA GPU unless replicating the original; "on" | "off"
    replicate_original: bool = False
    resume: bool = False
    seed: int = 42
    output_dir: str = ""  # "" = runs/<profile>
    memory_budget_gib: float = 0.0  # 0 = the device's memory; e.g. 8.0 for the RTX 2070 SUPER

    @classmethod
    def from_parameters(cls, namespace: dict[str, Any]) -> "TrainingSettings":
        """Pick the settings by name from a notebook's parameters (``globals()``) or a profile block."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in namespace.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingPlan:
    """What the settings resolve to on this machine (device, dtypes, optimiser, loss) and why."""

    device: str
    quantization: str | None
    compute_dtype: str
    fp16: bool
    bf16: bool
    optim: str
    loss: str  # "completion_only" (fixed) | "full_text" (original)
    pad_is_eos: bool
    train_sampling_strategy: str  # "random" (fixed) | "group_by_length" (original)
    kbit_upcast: bool  # prepare_model_for_kbit_training (original)
    recast_trainable_fp32: bool  # undo TRL's bf16 cast of trainable params under fp16
    fast_path: bool  # utils.fastpath: fused layers, offloaded checkpoints, padding-free batches
    per_device_train_batch_size: int  # the fast path runs batch x accumulation as one padding-free micro-batch
    gradient_accumulation_steps: int
    output_dir: str
    checkpoints_dir: str
    resume_from: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under ``accelerate launch``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun`` (the one that writes files), or a plain process."""
    return int(os.environ.get("RANK", 0)) == 0


def output_dir_of(settings: TrainingSettings) -> Path:
    """Folder of a run's outputs: ``output_dir`` when set, else ``runs/<profile>``."""
    return resolve_path(settings.output_dir) if settings.output_dir else run_dir(settings.profile)


def plan_training(settings: TrainingSettings, device: str | torch.device | None = None) -> TrainingPlan:
    """Resolve ``auto`` values, check the settings and say what differs from the original and why."""
    from utils.modeling import pick_compute_dtype

    device = torch.device(device) if device is not None else default_device()
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    _check_values(settings)

    if settings.quantization == "auto":
        quantization = "nf4_dq" if on_cuda else None
        if not on_cuda:
            notes.append(
                "quantization='auto' on the CPU: fp32 base model + LoRA (bitsandbytes 4-bit runs on the "
                "CPU too, but slower); on a GPU 'auto' means nf4_dq, as in the original."
            )
    else:
        quantization = None if settings.quantization == "none" else settings.quantization

    if settings.compute_dtype == "auto":
        compute = DTYPE_NAMES[pick_compute_dtype(device)]
    else:
        compute = settings.compute_dtype
    if compute in {"fp16", "bf16"} and not on_cuda:
        raise TrainingConfigError(
            f"compute_dtype={compute!r} needs a CUDA GPU (mixed precision with a gradient scaler); this "
            "machine has none. Set compute_dtype='auto' (fp32 on the CPU)."
        )
    if compute == "bf16" and on_cuda and torch.cuda.get_device_capability(device)[0] < 8:
        raise TrainingConfigError(
            f"compute_dtype='bf16' needs compute capability 8.0 or newer; {torch.cuda.get_device_name(device)} "
            f"has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}. Set compute_dtype='fp16' or 'auto'."
        )
    fp16, bf16 = compute == "fp16", compute == "bf16"

    optim = settings.optim
    if not on_cuda and ("8bit" in optim or "paged" in optim):
        notes.append(f"optim={optim!r} needs CUDA (bitsandbytes paged 8-bit states): using 'adamw_torch' on the CPU.")
        optim = "adamw_torch"

    original = settings.replicate_original
    quantized = quantization in BNB_QUANTIZATIONS
    if original:
        notes.append(
            "replicate_original=True: full-text loss (prompt included), pad = eos (every eos label "
            "masked, as the old collator did), length-grouped batches"
            + (", prepare_model_for_kbit_training upcast" if quantized else "")
            + "."
        )
    if fp16 and quantized:
        notes.append(
            "fp16 on a 4-bit model: TRL casts the trainable LoRA parameters to bf16, which fp16's gradient "
            "scaler cannot unscale; they are cast back to fp32 after the trainer is built."
        )

    fast = _resolve_fast_path(settings, on_cuda, quantization, original, notes)
    batch, accumulation = settings.per_device_train_batch_size, settings.gradient_accumulation_steps
    if fast and accumulation > 1:
        batch, accumulation = batch * accumulation, 1
        notes.append(
            f"fast path: the {settings.per_device_train_batch_size} x {settings.gradient_accumulation_steps} "
            f"micro-batches run as one padding-free micro-batch of {batch} sequences (the same sequences and "
            "loss per optimizer step, one forward/backward instead of several)."
        )

    out = output_dir_of(settings)
    checkpoints = out / CHECKPOINTS_DIR
    resume_from = None
    if settings.resume:
        resume_from = find_last_checkpoint(checkpoints)
        if resume_from is None:
            notes.append(f"resume=True but {checkpoints} holds no complete checkpoint: starting at step 0.")
        else:
            _check_resume_matches(settings, out)
            notes.append(f"resume=True: continuing from {resume_from.name}.")
    return TrainingPlan(
        device=str(device),
        quantization=quantization,
        compute_dtype=compute,
        fp16=fp16,
        bf16=bf16,
        optim=optim,
        loss="full_text" if original else "completion_only",
        pad_is_eos=original,
        train_sampling_strategy="group_by_length" if original else "random",
        kbit_upcast=original and quantized,
        recast_trainable_fp32=fp16,
        fast_path=fast,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        output_dir=str(out),
        checkpoints_dir=str(checkpoints),
        resume_from=str(resume_from) if resume_from else None,
        notes=notes,
    )


def _resolve_fast_path(settings: TrainingSettings, on_cuda: bool, quantization: str | None, original: bool,
                       notes: list[str]) -> bool:
    """Whether ``utils.fastpath`` runs: "auto" = on a CUDA GPU, 4-bit or 16-bit weights, not the original."""
    choice = settings.fast_path
    if choice not in FAST_PATH_CHOICES:
        raise TrainingConfigError(f"fast_path={choice!r}: use one of {', '.join(FAST_PATH_CHOICES)}.")
    if choice == "off":
        return False
    blockers = []
    if original:
        blockers.append("replicate_original=True trains the original configuration")
    if quantization == "int8":
        blockers.append("quantization='int8' (the fast path dequantises nf4/fp4 or reads 16-bit weights)")
    if choice == "on":
        if blockers:
            raise TrainingConfigError(f"fast_path='on' but {'; '.join(blockers)}. Set fast_path='auto' or 'off'.")
        return True
    if not on_cuda:
        return False
    if blockers:
        notes.append(f"fast_path='auto' stays off: {'; '.join(blockers)}.")
        return False
    from utils.fastpath import FastPathOptions

    notes.append(
        "fast path (utils.fastpath): fused q/k/v and gate/up GEMMs with fused LoRA, no fp32 upcast, checkpoints "
        f"offloaded to pinned CPU memory, Triton kernels (Liger's RMSNorm/SwiGLU, utils.kernels' RoPE) on passes of "
        f"{FastPathOptions().small_pass_tokens} tokens or more, padding-free batches; fast_path='off' gives the "
        "standard transformers + PEFT forward."
    )
    return True


def _check_values(s: TrainingSettings) -> None:
    """One clear error for a setting out of range (named, with the fix)."""
    if s.quantization not in QUANTIZATION_CHOICES:
        raise TrainingConfigError(f"quantization={s.quantization!r}: use one of {', '.join(QUANTIZATION_CHOICES)}.")
    if s.compute_dtype not in ("auto", *DTYPES):
        raise TrainingConfigError(f"compute_dtype={s.compute_dtype!r}: use 'auto', 'fp32', 'fp16' or 'bf16'.")
    positive = ("max_length", "lora_r", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_steps", "per_device_eval_batch_size", "eval_steps", "logging_steps", "save_steps")
    for name in positive:
        if getattr(s, name) < 1:
            raise TrainingConfigError(f"{name}={getattr(s, name)}: must be a positive integer.")
    if not 0 < s.learning_rate < 1:
        raise TrainingConfigError(f"learning_rate={s.learning_rate}: expected a value like 1e-4.")
    if s.warmup_steps >= s.max_steps:
        raise TrainingConfigError(
            f"warmup_steps={s.warmup_steps} is not below max_steps={s.max_steps}: the learning rate would "
            "never leave the warm-up. Lower warmup_steps or raise max_steps."
        )


def find_last_checkpoint(folder: str | Path) -> Path | None:
    """Newest *complete* ``checkpoint-N`` (its ``trainer_state.json``, written last, parses), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if not suffix.isdigit():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # killed while writing this checkpoint
        found.append((int(suffix), path))
    return max(found)[1] if found else None


def _check_resume_matches(settings: TrainingSettings, out: Path) -> None:
    """Refuse to resume a checkpoint written with other hyperparameters (it would mix two runs)."""
    config_path = out / CONFIG_FILE
    if not config_path.is_file():
        return
    saved = json.loads(config_path.read_text()).get("parameters", {})
    current = settings.to_dict()
    diff = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != current[k]]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {current[k]!r}" for k in diff)
        raise TrainingConfigError(
            f"resume=True, but the checkpoints in {out / CHECKPOINTS_DIR} come from a run with other settings "
            f"({pairs}). Use the same settings, or resume=False (starts over), or another output_dir."
        )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The training and evaluation datasets, in the form the loss needs, and the records behind them."""

    train: Any
    eval: Any
    train_records: list[dict]
    test_records: list[dict]


def _sample(records: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded subset of ``limit`` records across all topics (the files are ordered by fact)."""
    if not limit or limit >= len(records):
        return list(records)
    return random.Random(seed).sample(list(records), limit)


def load_training_tokenizer(settings: TrainingSettings, plan: TrainingPlan):
    """The model's tokenizer: pad distinct from EOS, or pad = EOS when replicating the original."""
    from utils.modeling import load_tokenizer, use_original_padding

    tokenizer = load_tokenizer(settings.model_name)
    if plan.pad_is_eos:
        use_original_padding(tokenizer)
    return tokenizer


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain-text tokenisation prepends the BOS token (Llama-3 does; SmolLM2 does not)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def strip_template_bos(dataset, tokenizer):
    """Drop the template's leading BOS from ``text`` when the tokenizer adds its own (one BOS, not two)."""
    bos = tokenizer.bos_token
    if not bos or not tokenizer_adds_bos(tokenizer):
        return dataset
    return dataset.map(lambda ex: {"text": ex["text"][len(bos):] if ex["text"].startswith(bos) else ex["text"]})


def load_training_data(settings: TrainingSettings, plan: TrainingPlan, tokenizer) -> TrainingData:
    """Read and validate both files (``DatasetError`` lists every problem) and build the datasets.

    Fixed: prompt–completion (the loss covers the answer and its end-of-turn token). Original: one
    ``text`` column rendered by the chat template (the loss covers every token).
    """
    from utils.data import load_records, to_prompt_completion, to_text_dataset

    train_records = _sample(load_records(settings.train_file), settings.train_limit, settings.seed)
    test_records = _sample(load_records(settings.test_file), settings.eval_limit, settings.seed)
    if plan.loss == "full_text":
        train = strip_template_bos(to_text_dataset(train_records, tokenizer), tokenizer)
        evaluation = strip_template_bos(to_text_dataset(test_records, tokenizer), tokenizer)
    else:
        train = to_prompt_completion(train_records)
        evaluation = to_prompt_completion(test_records)
    return TrainingData(train, evaluation, train_records, test_records)


# --------------------------------------------------------------------------------------------
# Memory: a rough estimate that stops configurations that cannot fit before anything loads
# --------------------------------------------------------------------------------------------

def _model_config(model_name: str):
    from transformers import AutoConfig

    from utils.modeling import model_folder, resolve_model, twin_config

    if resolve_model(model_name).is_twin:
        return twin_config()
    return AutoConfig.from_pretrained(model_folder(model_name))


def estimate_training_memory(settings: TrainingSettings, plan: TrainingPlan, config=None) -> dict[str, float]:
    """Peak memory of one training step by part, in GiB (1024**3 bytes): ``utils.memory``'s analytic model.

    Exact for weights, LoRA parameters, gradients and optimiser states; an estimate for activations and
    logits. Meant to stop configurations that cannot fit before anything is loaded.
    """
    from utils.memory import GIB, analytic_training_breakdown

    config = config if config is not None else _model_config(settings.model_name)
    if plan.kbit_upcast:
        variant = "prepare"
    else:
        variant = "no_prepare_gc" if settings.gradient_checkpointing else "no_prepare"
    compute = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[plan.compute_dtype]
    parts = analytic_training_breakdown(
        config,
        fmt=plan.quantization or plan.compute_dtype,
        variant=variant,
        compute_dtype=compute,
        autocast=plan.fp16 or plan.bf16,
        seq_len=settings.max_length,
        batch_size=settings.per_device_train_batch_size,
        r=settings.lora_r,
        optim=plan.optim,
    )
    return {f"{k}_gib": round(v / GIB, 3) for k, v in parts.items()}


def device_memory_gib(device: str | torch.device) -> float:
    """Memory of the device in GiB: the GPU's total memory, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1024**3
    import psutil

    return psutil.virtual_memory().available / 1024**3


def check_memory(settings: TrainingSettings, plan: TrainingPlan, config=None) -> dict[str, float]:
    """Estimate the peak and stop with one message if it exceeds the budget; return the estimate."""
    estimate = estimate_training_memory(settings, plan, config)
    budget = settings.memory_budget_gib or device_memory_gib(plan.device)
    estimate["budget_gib"] = round(budget, 3)
    if estimate["total_gib"] > budget:
        where = f"memory_budget_gib={settings.memory_budget_gib}" if settings.memory_budget_gib else plan.device
        activations = estimate["total_gib"] - estimate["weights_gib"]
        raise TrainingConfigError(
            f"this configuration needs about {estimate['total_gib']:.1f} GiB (weights {estimate['weights_gib']:.1f}, "
            f"LoRA, optimiser, activations and logits {activations:.1f}) but {where} has {budget:.1f} GiB. Lower "
            f"per_device_train_batch_size ({settings.per_device_train_batch_size}) and raise "
            f"gradient_accumulation_steps to keep the effective batch, lower max_length ({settings.max_length}), "
            f"set gradient_checkpointing=True, or quantization='nf4_dq'."
        )
    return estimate


# --------------------------------------------------------------------------------------------
# Model and trainer
# --------------------------------------------------------------------------------------------


def load_training_model(settings: TrainingSettings, plan: TrainingPlan):
    """Base model as the plan says (quantised or not, on the plan's device); the original upcast if asked."""
    from utils.modeling import load_model

    model = load_model(
        settings.model_name, quantization=plan.quantization, device=plan.device,
        compute_dtype=DTYPES[plan.compute_dtype],
    )
    if plan.kbit_upcast:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model


def build_sft_config(settings: TrainingSettings, plan: TrainingPlan):
    """``SFTConfig`` with every hyperparameter of the original set explicitly (TRL's defaults differ)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=plan.checkpoints_dir,
        # data: TRL's defaults are max_length=1024 and, for prompt-completion data, completion-only loss
        max_length=settings.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=plan.loss == "completion_only",
        assistant_only_loss=False,
        dataset_text_field="text",
        # the original hyperparameters (TRL's default learning rate is 2e-5)
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        lr_scheduler_type=settings.lr_scheduler_type,
        optim=plan.optim,
        # precision: TRL turns bf16 on unless told otherwise, which fails on a Turing GPU
        fp16=plan.fp16,
        bf16=plan.bf16,
        # the original got gradient checkpointing from prepare_model_for_kbit_training; the fast path
        # checkpoints each layer itself
        **{_checkpointing_field(SFTConfig): settings.gradient_checkpointing and not plan.fast_path},
        # DDP: every LoRA parameter gets a gradient each step (and the fast path's checkpoints are reentrant)
        ddp_find_unused_parameters=False,
        train_sampling_strategy=plan.train_sampling_strategy,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        eval_on_start=settings.eval_on_start and plan.resume_from is None,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        report_to="none",
    )


def _checkpointing_field(config_class) -> str:
    """``activation_checkpointing`` since transformers 5.2x (``gradient_checkpointing`` is its deprecated alias)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


class OriginalPadMaskingCollator:
    """TRL's collator, then every token equal to the pad token loses its label, as the original's did.

    The original padded with EOS and let ``DataCollatorForLanguageModeling`` mask ``labels == pad``, so
    the EOS that closes each answer never carried loss. TRL 1.x builds labels before padding and would
    train the EOS anyway; this wrapper restores the old behaviour for ``replicate_original``.
    """

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad_token_id = pad_token_id
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["labels"][batch["input_ids"] == self.pad_token_id] = -100
        return batch


def _check_fast_path_model(settings: TrainingSettings, plan: TrainingPlan, model) -> None:
    """A model the fast path cannot run: an error for fast_path='on', the standard forward for 'auto'."""
    from utils.fastpath import unsupported_reason

    reason = unsupported_reason(model)
    if reason is None:
        return
    if settings.fast_path == "on":
        raise TrainingConfigError(f"fast_path='on' but {reason}. Set fast_path='auto' or 'off'.")
    plan.fast_path = False
    plan.per_device_train_batch_size = settings.per_device_train_batch_size
    plan.gradient_accumulation_steps = settings.gradient_accumulation_steps
    plan.notes.append(f"fast_path='auto' stays off: {reason}; the standard forward trains this model.")


def use_flat_optimizer(trainer, plan: TrainingPlan) -> bool:
    """With the fast path, bitsandbytes' 8-bit optimizer updates all LoRA tensors in one call (same numbers)."""
    from utils.speed.optim import FlatOptimizer, flat_unsupported_reason

    if "8bit" not in plan.optim:
        return False
    reason = flat_unsupported_reason(p for p in trainer.model.parameters() if p.requires_grad)
    if reason:
        plan.notes.append(f"{plan.optim} updates tensor by tensor: {reason}.")
        return False
    inner_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    trainer.optimizer_cls_and_kwargs = (FlatOptimizer, {"inner_cls": inner_cls, **kwargs})
    plan.notes.append(f"{plan.optim} updates every LoRA tensor in one call (utils.optim.FlatOptimizer).")
    return True


def recast_trainable_parameters(model, dtype: torch.dtype = torch.float32) -> int:
    """Cast every trainable parameter to ``dtype`` (fp32 for fp16's gradient scaler); return how many."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def trainable_dtypes(model) -> dict[str, int]:
    """Number of trainable parameters (elements) per dtype."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = str(param.dtype).replace("torch.", "")
            counts[key] = counts.get(key, 0) + param.numel()
    return counts


def build_trainer(settings: TrainingSettings, plan: TrainingPlan, model, tokenizer, data: TrainingData,
                  callbacks: list | None = None):
    """``SFTTrainer(processing_class=..., peft_config=...)``; then the fp16 recast and the BOS check."""
    from trl import SFTTrainer

    from utils.modeling import build_lora_config

    if plan.fast_path:
        _check_fast_path_model(settings, plan, model)
    collator = None
    if plan.pad_is_eos:
        collator = OriginalPadMaskingCollator(tokenizer.pad_token_id)
        model.config.pad_token_id = tokenizer.pad_token_id
    elif plan.fast_path:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        # One row of real tokens per micro-batch, positions restarting at 0 for each example. TRL's own
        # padding_free=True refuses max_length; the examples are truncated to max_length when tokenised.
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(settings, plan),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=build_lora_config(settings.lora_r, settings.lora_alpha, settings.lora_dropout),
        data_collator=collator,
        callbacks=[HistoryCsvCallback(Path(plan.output_dir) / HISTORY_FILE), *(callbacks or [])],
    )
    if plan.recast_trainable_fp32:
        recast_trainable_parameters(trainer.model, torch.float32)
    if plan.fast_path:
        from utils.fastpath import enable_fast_path

        fast = enable_fast_path(trainer.model, DTYPES[plan.compute_dtype])
        plan.notes.append(f"fast path resolved: {fast.describe()}")
        use_flat_optimizer(trainer, plan)
    check_bos(trainer.train_dataset, tokenizer)
    return trainer


# --------------------------------------------------------------------------------------------
# The traps, made visible
# --------------------------------------------------------------------------------------------


def bos_counts(dataset, tokenizer) -> list[int]:
    """BOS tokens per tokenised example."""
    bos = tokenizer.bos_token_id
    return [ids.count(bos) for ids in dataset["input_ids"]]


def expected_bos(tokenizer) -> int | None:
    """BOS tokens one chat should hold: 1 for Llama-3; None when BOS also opens each turn (ChatML)."""
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    n = ids.count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 0
    return 1 if n == 1 else None


def check_bos(dataset, tokenizer) -> None:
    """Raise if a tokenised example holds more or less than its template's BOS (a doubled BOS, say)."""
    expected = expected_bos(tokenizer)
    if expected is None:
        return
    counts = bos_counts(dataset, tokenizer)
    wrong = [i for i, c in enumerate(counts) if c != expected]
    if wrong:
        raise TrainingConfigError(
            f"{len(wrong)} training examples hold {counts[wrong[0]]} BOS tokens ({tokenizer.bos_token}) instead "
            f"of {expected} (first: example {wrong[0]}). The text already starts with BOS and the tokenizer "
            "adds another: drop it from the text (strip_template_bos) or tokenise without special tokens."
        )


def label_table(trainer, tokenizer, index: int = 0):
    """One training example token by token: its id, the token, and whether it carries loss."""
    import pandas as pd

    example = trainer.train_dataset[index]
    batch = trainer.data_collator([example])  # labels exactly as the loss sees them
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    return pd.DataFrame({
        "posición": range(len(ids)),
        "id": ids,
        "token": [tokenizer.decode([i]) for i in ids],
        "con_pérdida": [label != -100 for label in labels],
    })


def describe_labels(table, tokenizer) -> dict[str, Any]:
    """What a label table shows: text with and without loss, and whether EOS/pad carry loss."""
    trained = table[table["con_pérdida"]]
    masked = table[~table["con_pérdida"]]
    eos_rows = table[table["id"] == tokenizer.eos_token_id]
    return {
        "tokens": len(table),
        "tokens_con_pérdida": len(trained),
        # decoded as runs of ids: a character split across tokens decodes whole
        "texto_con_pérdida": tokenizer.decode(trained["id"].tolist()),
        "texto_enmascarado": tokenizer.decode(masked["id"].tolist()),
        "eos_en_el_ejemplo": len(eos_rows),
        "eos_con_pérdida": int(eos_rows["con_pérdida"].sum()),
        # the EOS that closes the answer: the one the model must learn to emit
        "eos_final_con_pérdida": bool(len(eos_rows)) and bool(eos_rows["con_pérdida"].iloc[-1]),
        "bos": int((table["id"] == tokenizer.bos_token_id).sum()),
        "pad_es_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
    }


def labels_html(table) -> str:
    """HTML of a label table: grey = masked (-100), green = carries loss."""
    import html

    spans = []
    for token, trained in zip(table["token"], table["con_pérdida"]):
        style = "background:#b7e4c7;" if trained else "background:#e9ecef;color:#6c757d;"
        shown = html.escape(token).replace("\n", "↵<br>")
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    return "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def double_bos_table(records: list[dict], tokenizer_name: str = "llama-3.2"):
    """BOS count of one example with the Llama-3.2 tokenizer, the way each pipeline tokenises it."""
    import pandas as pd

    from utils.data import to_text_dataset
    from utils.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    bos = tokenizer.bos_token_id
    messages = records[0]["messages"]
    text = to_text_dataset(records[:1], tokenizer)[0]["text"]
    stripped = strip_template_bos(to_text_dataset(records[:1], tokenizer), tokenizer)[0]["text"]
    chat = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    rows = [
        ("texto de la plantilla + tokenizer(text) (script original)", tokenizer(text)["input_ids"]),
        ("texto sin el BOS de la plantilla + tokenizer(text) (replicate_original)", tokenizer(stripped)["input_ids"]),
        ("prompt–completion: apply_chat_template (corregido)", chat),
    ]
    return pd.DataFrame(
        [{"tokenización": name, "BOS": ids.count(bos), "primeros tokens": tokenizer.convert_ids_to_tokens(ids[:3])}
         for name, ids in rows]
    )


def trainable_parameter_counts(model_name: str = "llama-3.2-3b-twin", r: int = THESIS.lora_r) -> dict[str, Any]:
    """PEFT's own count of trainable and total parameters with the thesis LoRA (shapes only, no memory)."""
    from peft import get_peft_model

    from utils.modeling import build_lora_config, build_twin, resolve_model

    if resolve_model(model_name).is_twin:
        model = build_twin("meta")
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_model_config(model_name))
    peft_model = get_peft_model(model, build_lora_config(r=r))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"modelo": model_name, "r": r, "entrenables": trainable, "totales": total,
            "porcentaje": round(100 * trainable / total, 3)}


def settings_table(settings: TrainingSettings, plan: TrainingPlan):
    """Each setting: the original script's value, this run's value, and what it resolved to."""
    import pandas as pd

    original = TrainingSettings()
    resolved = {
        "quantization": plan.quantization or "sin cuantizar",
        "compute_dtype": plan.compute_dtype,
        "optim": plan.optim,
        "replicate_original": f"pérdida {plan.loss}, pad = eos: {plan.pad_is_eos}, muestreo "
                              f"{plan.train_sampling_strategy}, upcast: {plan.kbit_upcast}",
        "resume": plan.resume_from or "desde el paso 0",
        "output_dir": plan.output_dir,
    }
    rows = []
    for f in dataclasses.fields(TrainingSettings):
        mine, theirs = getattr(settings, f.name), getattr(original, f.name)
        rows.append({"parámetro": f.name, "script original": theirs, "esta corrida": mine,
                     "resuelto": resolved.get(f.name, ""), "difiere": "≠" if mine != theirs else ""})
    return pd.DataFrame(rows).set_index("parámetro")


def stop_rate_records(settings: TrainingSettings, n: int) -> list[dict]:
    """A seeded sample of ``n`` test records (all when ``n`` is 0) for the stop-rate measurement."""
    from utils.data import load_records

    return _sample(load_records(settings.test_file), n, settings.seed)


def describe_run(settings: TrainingSettings, plan: TrainingPlan, result: dict[str, Any], labels: dict[str, Any],
                 stop_summary=None, history=None) -> str:
    """Markdown bullets (Spanish) stating what this run's numbers show, for the closing section."""
    lines = [
        f"- Se entrenaron **{result['global_step']} pasos** en `{plan.device}` en {result['train_seconds']:.0f} s "
        f"(**{result['tokens_per_second']} tokens/s** sin contar relleno; pico de memoria "
        f"{result['peak_memory_gib']} GiB, {result['peak_memory_kind']})."
    ]
    if result["first_train_loss"] is not None and result["last_train_loss"] is not None:
        lines.append(f"- Pérdida de entrenamiento: **{result['first_train_loss']:.3f} → {result['last_train_loss']:.3f}**.")
    first, last = result["first_eval_loss"], result["last_eval_loss"]
    if first is not None and last is not None:
        change = 100 * (last - first) / first
        verdict = "baja" if last < first else "no baja"
        lines.append(f"- Pérdida de evaluación (test): **{first:.3f} → {last:.3f}** ({change:+.1f}%): {verdict}.")
    lines.append(
        f"- En el ejemplo decodificado, {labels['tokens_con_pérdida']} de {labels['tokens']} tokens llevan pérdida; "
        + ("entre ellos el EOS que cierra la respuesta, así que el modelo aprende a cortar."
           if labels["eos_final_con_pérdida"] else "**el EOS que cierra la respuesta no lleva pérdida**: el modelo "
           "no aprende a cortar.")
        + f" pad = eos: {labels['pad_es_eos']}; BOS por ejemplo: {labels['bos']}."
    )
    if stop_summary is not None and len(stop_summary):
        rates = stop_summary.set_index("modelo")
        n = int(rates.loc["ajustado", "preguntas"])
        lines.append(
            f"- Con `max_new_tokens = {int(rates.loc['ajustado', 'max_new_tokens'])}`, el modelo base termina con EOS "
            f"en **{int(rates.loc['base', 'terminan_con_eos'])}/{n}** respuestas y el ajustado en "
            f"**{int(rates.loc['ajustado', 'terminan_con_eos'])}/{n}**."
        )
    if history is not None and "grad_norm" in history:
        norms = history["grad_norm"].dropna()
        clipped = int((norms > settings.max_grad_norm).sum())
        lines.append(
            f"- La norma del gradiente superó `max_grad_norm = {settings.max_grad_norm:g}` en **{clipped} de "
            f"{len(norms)}** pasos registrados (mediana {norms.median():.2f}): el recorte actuó "
            + ("en todos" if clipped == len(norms) else "en casi todos" if clipped > 0.8 * len(norms) else
               "sólo en algunos")
            + (", así que fija el tamaño de cada paso junto con la tasa de aprendizaje."
               if clipped > 0.8 * len(norms) else ".")
        )
    dtypes = ", ".join(f"{k}" for k in result["trainable_dtypes"])
    lines.append(f"- Parámetros entrenables en {dtypes}; precisión de cómputo {plan.compute_dtype}, optimizador "
                 f"`{plan.optim}`.")
    if plan.optim != settings.optim:
        lines.append(f"- `{settings.optim}` necesita CUDA: en `{plan.device}` se usó `{plan.optim}`.")
    if settings.quantization == "auto" and plan.quantization is None:
        lines.append("- En CPU el modelo base se entrenó sin cuantizar (fp32); en GPU `auto` usa NF4 con doble "
                     "cuantización, como el original.")
    if plan.recast_trainable_fp32:
        lines.append("- Cómputo fp16: los parámetros entrenables se devolvieron a fp32 después de construir el "
                     "trainer, y el escalador de gradientes funcionó.")
    if plan.resume_from:
        lines.append(f"- La corrida continuó desde `{Path(plan.resume_from).name}`.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Callbacks: the log as CSV after every log, and the live plot
# --------------------------------------------------------------------------------------------


def history_frame(log_history: list[dict]):
    """The trainer's log history as a table, one row per log event."""
    import pandas as pd

    return pd.DataFrame(log_history)


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _CallbackBase = object


class HistoryCsvCallback(_CallbackBase):
    """Rewrite ``04_log_history.csv`` after every log, so a crash keeps every logged point."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            history_frame(state.log_history).to_csv(self.path, index=False)


class ThroughputCallback(_CallbackBase):
    """Wall time and tokens seen (all ranks) at the end of every optimizer step: steady-state tokens/s."""

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.marks: list[tuple[float, int, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.global_step, int(state.num_input_tokens_seen)))

    def steady_tokens_per_second(self) -> float | None:
        """Tokens/s after the first ``skip`` steps (kernel compilation and caches warm up there)."""
        if len(self.marks) <= self.skip + 1:
            return None
        (t0, _, n0), (t1, _, n1) = self.marks[self.skip], self.marks[-1]
        return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (JupyterLab, papermill), where figures can update in place."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except ImportError:
        return False


def draw_training(fig, history, max_steps: int | None = None, grad_norm: bool = False):
    """Draw loss (train and eval) and learning rate on ``fig`` from a log-history table."""
    from utils.plotting import COLORS

    fig.clear()
    panels = 3 if grad_norm else 2
    axes = fig.subplots(1, panels)
    ax_loss, ax_lr = axes[0], axes[1]
    if "loss" in history:
        train = history.dropna(subset=["loss"])
        ax_loss.plot(train["step"], train["loss"], color=COLORS["train"], label="entrenamiento", linewidth=1.2)
    if "eval_loss" in history:
        ev = history.dropna(subset=["eval_loss"])
        ax_loss.plot(ev["step"], ev["eval_loss"], color=COLORS["eval"], marker="o", label="evaluación")
    ax_loss.set_xlabel("Paso de optimización")
    ax_loss.set_ylabel("Pérdida (entropía cruzada, nats/token)")
    ax_loss.legend()
    if "learning_rate" in history:
        lr = history.dropna(subset=["learning_rate"])
        ax_lr.plot(lr["step"], lr["learning_rate"], color=COLORS["tuned"])
    ax_lr.set_xlabel("Paso de optimización")
    ax_lr.set_ylabel("Tasa de aprendizaje")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if grad_norm and "grad_norm" in history:
        gn = history.dropna(subset=["grad_norm"])
        axes[2].plot(gn["step"], gn["grad_norm"], color=COLORS["base"])
        axes[2].set_xlabel("Paso de optimización")
        axes[2].set_ylabel("Norma del gradiente (antes del recorte)")
    if max_steps:
        for ax in axes:
            ax.set_xlim(0, max_steps)
    fig.tight_layout()
    return fig


class LivePlotCallback(_CallbackBase):
    """Redraw loss and learning rate in place in the notebook output as they are logged.

    One display handle is created at the start and updated after each log (at most every
    ``min_interval_s`` seconds, and always at the end), so the last state stays in the saved notebook.
    Outside a Jupyter kernel it does nothing (the command line has the progress bar and the CSV).
    """

    def __init__(self, max_steps: int | None = None, min_interval_s: float = 1.0):
        self.max_steps = max_steps
        self.min_interval_s = min_interval_s
        self.handle = None
        self._last = 0.0
        self.enabled = in_notebook()

    def _render(self, state) -> Any:
        from IPython.display import Image
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.6))
        draw_training(fig, history_frame(state.log_history), self.max_steps)
        step = state.global_step
        fig.suptitle(f"Paso {step} de {self.max_steps or state.max_steps}", fontsize=10, y=1.02)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        return Image(data=buf.getvalue(), format="png")

    def _update(self, state, force: bool = False) -> None:
        if not self.enabled or not state.is_world_process_zero or not state.log_history:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        image = self._render(state)
        if self.handle is None:
            from IPython.display import display

            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, force=True)


# --------------------------------------------------------------------------------------------
# Training, saving, loading
# --------------------------------------------------------------------------------------------


def write_config(settings: TrainingSettings, plan: TrainingPlan, trainer=None) -> Path:
    """``04_config.json``: parameters, the resolved plan, LoRA and (when built) the full SFTConfig."""
    from utils.provenance import library_versions

    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "notebook": NOTEBOOK,
        "model_name": settings.model_name,
        "quantization": plan.quantization,
        "compute_dtype": plan.compute_dtype,
        "replicate_original": settings.replicate_original,
        "device": plan.device,
        "parameters": settings.to_dict(),
        "plan": plan.to_dict(),
        "lora": {"r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
                 "target_modules": list(THESIS.target_modules), "bias": "none", "task_type": "CAUSAL_LM"},
        "versions": library_versions(),
    }
    if trainer is not None:
        record["sft_config"] = trainer.args.to_dict()
    path = out / CONFIG_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path


def oom_message(settings: TrainingSettings, plan: TrainingPlan, error: BaseException) -> str:
    """The knobs that lower the peak memory, with their current values."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"out of memory during training on {plan.device} ({first}). Lower the peak with: "
        f"per_device_train_batch_size={settings.per_device_train_batch_size} → smaller (raise "
        f"gradient_accumulation_steps={settings.gradient_accumulation_steps} to keep the effective batch); "
        f"max_length={settings.max_length} → shorter; gradient_checkpointing={settings.gradient_checkpointing} "
        f"→ True; per_device_eval_batch_size={settings.per_device_eval_batch_size} → 1; quantization="
        f"{plan.quantization!r} → 'nf4_dq'. Checkpoints so far are in {plan.checkpoints_dir}: "
        "rerun with resume=True after changing only batch/accumulation-free knobs."
    )


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text
    )


def peak_memory_gib(device: str | torch.device) -> float:
    """Peak memory of this process in GiB: ``max_memory_allocated`` on a GPU, peak RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3  # ru_maxrss is KiB on Linux


def run_training(trainer, settings: TrainingSettings, plan: TrainingPlan) -> dict[str, Any]:
    """``trainer.train()`` (from the last checkpoint when resuming); OOM becomes one clear error.

    Returns steps, wall time, tokens/s (non-padding tokens of this session), peak memory and losses.
    """
    from transformers import set_seed

    if is_main_process():
        if plan.resume_from is None:
            shutil.rmtree(plan.checkpoints_dir, ignore_errors=True)  # a fresh run must not rotate old ones
        write_config(settings, plan, trainer)  # before training: a resumed run checks against it
    # The sampler draws from the global generator: the same order whatever ran before this cell.
    set_seed(settings.seed)
    device = torch.device(plan.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens_before = 0
    if plan.resume_from:
        state = json.loads((Path(plan.resume_from) / "trainer_state.json").read_text())
        tokens_before = state.get("num_input_tokens_seen", 0)
    throughput = ThroughputCallback()
    if hasattr(trainer, "add_callback"):
        trainer.add_callback(throughput)
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=plan.resume_from)
    except Exception as error:  # noqa: BLE001 - only OOM is translated, the rest re-raised as is
        if _is_oom(error):
            raise TrainingOutOfMemoryError(oom_message(settings, plan, error)) from None
        raise
    seconds = time.perf_counter() - start
    history = history_frame(trainer.state.log_history)
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    train_losses = history["loss"].dropna() if "loss" in history else []
    eval_losses = history["eval_loss"].dropna() if "eval_loss" in history else []
    return {
        "global_step": trainer.state.global_step,
        "resumed_from": plan.resume_from,
        "train_seconds": round(seconds, 1),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "tokens_trained": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "steady_tokens_per_second": throughput.steady_tokens_per_second(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "peak_memory_gib": round(peak_memory_gib(plan.device), 3),
        "peak_memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
        "first_train_loss": float(train_losses.iloc[0]) if len(train_losses) else None,
        "last_train_loss": float(train_losses.iloc[-1]) if len(train_losses) else None,
        "first_eval_loss": float(eval_losses.iloc[0]) if len(eval_losses) else None,
        "last_eval_loss": float(eval_losses.iloc[-1]) if len(eval_losses) else None,
        "trainable_dtypes": trainable_dtypes(trainer.model),
    }


def save_training_outputs(trainer, tokenizer, settings: TrainingSettings, plan: TrainingPlan) -> dict[str, Path]:
    """Adapter (safetensors) + tokenizer in ``04_adapter/``, ``04_config.json``, ``04_log_history.csv``."""
    out = Path(plan.output_dir)
    adapter = out / ADAPTER_DIR
    if trainer.is_world_process_zero():
        shutil.rmtree(adapter, ignore_errors=True)
    trainer.save_model(str(adapter))  # PEFT model: adapter_model.safetensors + adapter_config.json
    paths = {"adapter": adapter}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(adapter)
        paths["config"] = write_config(settings, plan, trainer)
        history = out / HISTORY_FILE
        history_frame(trainer.state.log_history).to_csv(history, index=False)
        paths["history"] = history
    return paths


def load_history(output_dir: str | Path):
    """The saved log history (``04_log_history.csv``) of a run."""
    import pandas as pd

    return pd.read_csv(Path(output_dir) / HISTORY_FILE)


def plot_loss_curve(history, max_steps: int | None = None):
    """Train and eval loss against the optimisation step (``04_loss_curve``)."""
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS

    fig, ax = plt.subplots()
    train = history.dropna(subset=["loss"]) if "loss" in history else history.iloc[:0]
    ev = history.dropna(subset=["eval_loss"]) if "eval_loss" in history else history.iloc[:0]
    ax.plot(train["step"], train["loss"], color=COLORS["train"], linewidth=1.2, label="Entrenamiento")
    ax.plot(ev["step"], ev["eval_loss"], color=COLORS["eval"], marker="o", label="Evaluación (test)")
    ax.set_xlabel("Paso de optimización")
    ax.set_ylabel("Pérdida (entropía cruzada, nats/token)")
    if max_steps:
        ax.set_xlim(0, max_steps)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_learning_rate(history):
    """Learning rate against the step: warm-up then cosine decay (``04_learning_rate``)."""
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS

    fig, ax = plt.subplots()
    lr = history.dropna(subset=["learning_rate"])
    ax.plot(lr["step"], lr["learning_rate"], color=COLORS["tuned"])
    ax.set_xlabel("Paso de optimización")
    ax.set_ylabel("Tasa de aprendizaje")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    return fig


def plot_grad_norm(history, max_grad_norm: float | None = None):
    """Gradient norm before clipping against the step, with the clipping threshold (``04_grad_norm``)."""
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS

    fig, ax = plt.subplots()
    gn = history.dropna(subset=["grad_norm"])
    ax.plot(gn["step"], gn["grad_norm"], color=COLORS["base"], linewidth=1.2, label="Norma del gradiente")
    if max_grad_norm:
        ax.axhline(max_grad_norm, color=COLORS["budget"], linestyle="--", label=f"max_grad_norm = {max_grad_norm:g}")
    ax.set_xlabel("Paso de optimización")
    ax.set_ylabel("Norma L2 del gradiente (antes del recorte)")
    ax.legend()
    fig.tight_layout()
    return fig


def load_trained(output_dir: str | Path, device: str | torch.device | None = None):
    """Base model loaded as in training (same model, quantisation, compute dtype) + the saved adapter.

    Returns ``(model, tokenizer)`` in eval mode; the tokenizer is the one saved with the adapter.
    On a machine without CUDA a run trained in fp16/bf16 is loaded with fp32 compute.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from utils.modeling import load_model

    output_dir = resolve_path(output_dir)
    config_path = output_dir / CONFIG_FILE
    adapter = output_dir / ADAPTER_DIR
    if not config_path.is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{output_dir} holds no finished training run (missing {CONFIG_FILE} or "
            f"{ADAPTER_DIR}/adapter_model.safetensors). Run notebook 04 or `python -m utils.training` first."
        )
    config = json.loads(config_path.read_text())
    device = torch.device(device) if device is not None else default_device()
    compute = config["compute_dtype"] if device.type == "cuda" else "fp32"
    model = load_model(config["model_name"], quantization=config["quantization"], device=device,
                       compute_dtype=DTYPES[compute])
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Does the model stop? Greedy generations that end with EOS before max_new_tokens
# --------------------------------------------------------------------------------------------


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8,
                     adapter: bool = True):
    """Greedy answers to the records' questions; per record: did it stop, new tokens, the answer.

    A table view of ``utils.evaluation.generate_answers`` (the one batched, left-padded generator).
    """
    import pandas as pd

    from utils.evaluation import generate_answers as generate

    answers = generate(model, tokenizer, [r["messages"][:-1] for r in records], max_new_tokens,
                       batch_size=batch_size, adapter=adapter, progress=False)
    return pd.DataFrame([
        {"id": r.get("id"), "termina": a["stopped"], "tokens_nuevos": a["n_tokens"], "respuesta": a["answer"]}
        for r, a in zip(records, answers)
    ])


def compare_stop_rates(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8):
    """Stop rate of the base model (adapter off) and the tuned model on the same questions."""
    import pandas as pd

    base = generate_answers(model, tokenizer, records, max_new_tokens, batch_size, adapter=False)
    tuned = generate_answers(model, tokenizer, records, max_new_tokens, batch_size, adapter=True)
    summary = pd.DataFrame([
        {"modelo": name, "preguntas": len(df), "terminan_con_eos": int(df["termina"].sum()),
         "tasa_de_corte": round(float(df["termina"].mean()), 3) if len(df) else float("nan"),
         "tokens_nuevos_mediana": float(df["tokens_nuevos"].median()) if len(df) else float("nan"),
         "max_new_tokens": max_new_tokens}
        for name, df in (("base", base), ("ajustado", tuned))
    ])
    return summary, base, tuned


# --------------------------------------------------------------------------------------------
# Run record and command line
# --------------------------------------------------------------------------------------------


def write_training_record(settings: TrainingSettings, training_plan: TrainingPlan, stopwatch, **results) -> Path:
    """``04_run.json`` in the run's folder (``utils.provenance.write_run_record`` for the profile folder)."""
    from utils.provenance import device_info, library_versions, write_run_record

    out = Path(training_plan.output_dir)
    if out.resolve() == run_dir(settings.profile).resolve():
        return write_run_record(NOTEBOOK, settings.profile, settings.to_dict(), stopwatch, **results)
    record = {
        "notebook": NOTEBOOK, "profile": settings.profile, "parameters": settings.to_dict(),
        "started_at": stopwatch.started_at, "wall_time_s": stopwatch.seconds, "versions": library_versions(),
        **device_info(), **results,
    }
    path = out / RUN_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return path


def profile_settings(profile: str, **overrides: Any) -> TrainingSettings:
    """Settings of a profile: the thesis defaults, the profile's common and "04" keys, then overrides."""
    params = notebook_parameters(load_profile(profile), NOTEBOOK)
    params.update({k: v for k, v in overrides.items() if v is not None})
    params["profile"] = profile
    for key in NOTEBOOK_ONLY:
        params.pop(key, None)
    names = {f.name for f in dataclasses.fields(TrainingSettings)}
    unknown = set(params) - names
    if unknown:
        raise TrainingConfigError(f"unknown training settings {sorted(unknown)}; known: {sorted(names)}")
    return TrainingSettings(**params)


def train(settings: TrainingSettings, callbacks: list | None = None, verbose: bool = True,
          keep_trl_bf16_adapters: bool = False) -> dict[str, Any]:
    """The whole run, in the notebook's order: plan → data → memory check → model → trainer → train → save.

    ``keep_trl_bf16_adapters`` skips the fp16 recast, to show the gradient-scaler error it prevents.
    """
    from utils.provenance import Stopwatch

    stopwatch = Stopwatch()
    plan = plan_training(settings)
    if keep_trl_bf16_adapters:
        plan.recast_trainable_fp32 = False
        plan.notes.append("--keep-trl-bf16-adapters: the trainable parameters stay as TRL leaves them.")
    for note in plan.notes:
        print(f"note: {note}")
    tokenizer = load_training_tokenizer(settings, plan)
    data = load_training_data(settings, plan, tokenizer)
    estimate = check_memory(settings, plan)
    model = load_training_model(settings, plan)
    trainer = build_trainer(settings, plan, model, tokenizer, data, callbacks)
    result = run_training(trainer, settings, plan)
    save_training_outputs(trainer, tokenizer, settings, plan)
    result["memory_estimate_gib"] = estimate
    if trainer.is_world_process_zero():
        write_training_record(settings, plan, stopwatch, plan=plan.to_dict(), training=result)
    if verbose and trainer.is_world_process_zero():
        print(success_line(settings, plan, result))
    return result


def success_line(settings: TrainingSettings, plan: TrainingPlan, result: dict[str, Any]) -> str:
    """One line that says the run finished, with what a reader checks first."""
    dtypes = ", ".join(f"{k}: {v:,}" for k, v in result["trainable_dtypes"].items())
    scaler = " fp16 + gradient scaler OK;" if plan.fp16 else ""
    return (
        f"TRAINING OK:{scaler} {result['global_step']} steps on {plan.device} "
        f"(model={settings.model_name}, quantization={plan.quantization}, compute={plan.compute_dtype}, "
        f"optim={plan.optim}); trainable params {dtypes}; train loss {result['first_train_loss']} → "
        f"{result['last_train_loss']}, eval loss {result['first_eval_loss']} → {result['last_eval_loss']}; "
        f"{result['tokens_per_second']} tokens/s; peak {result['peak_memory_gib']} GiB; adapter in "
        f"{Path(plan.output_dir) / ADAPTER_DIR}"
    )


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag`` per setting (``--max-steps``), plus ``--model`` for ``--model-name``."""
    parser = argparse.ArgumentParser(prog="python -m utils.training", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="thesis", help="profile YAML in notebooks/params (default: thesis)")
    for f in dataclasses.fields(TrainingSettings):
        if f.name == "profile":
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + (["--model"] if f.name == "model_name" else [])
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None)
    parser.add_argument("--keep-trl-bf16-adapters", action="store_true",
                        help="skip the fp16 recast of the trainable parameters (shows the error it prevents)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m utils.training``; user errors print one message and exit with 2."""
    from utils.config import ProfileError
    from utils.data import DatasetError
    from utils.modeling import ModelNotAvailableError

    args = vars(build_parser().parse_args(argv))
    profile = args.pop("profile")
    keep_bf16 = args.pop("keep_trl_bf16_adapters")
    try:
        settings = profile_settings(profile, **args)
        train(settings, keep_trl_bf16_adapters=keep_bf16)
    except (TrainingConfigError, TrainingOutOfMemoryError, DatasetError, ModelNotAvailableError,
            ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
