"""The model and its trainer: the memory check before loading, the base model, ``SFTConfig`` and ``SFTTrainer``.

``build_trainer`` also applies the fixes the plan asks for (fp16 recast of the trainable parameters, the fast
path and its one-call optimizer) and refuses a dataset with a doubled BOS.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import psutil
import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import EarlyStoppingCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from utils.device import compute_capability, dtype_name, restrict_sdpa_to_capability, torch_dtype
from utils.memory import analytic_training_breakdown, load_model_config
from utils.modeling import build_lora_config, load_model
from utils.paths import HISTORY_FILE, PROGRESS_FILE
from utils.speed import FastPathOptions, enable_fast_path, unsupported_reason
from utils.speed.optim import FlatOptimizer, flat_unsupported_reason
from utils.training.callbacks import HistoryCsvCallback, ProgressFileCallback, in_notebook
from utils.training.data import TrainingData, check_bos
from utils.training.settings import TrainingConfigError, TrainingPlan, TrainingSettings
from utils.units import GIB

# --------------------------------------------------------------------------------------------
# Memory: a rough estimate that stops configurations that cannot fit before anything loads
# --------------------------------------------------------------------------------------------


def estimate_training_memory(settings: TrainingSettings, plan: TrainingPlan, config=None) -> dict[str, float]:
    """Peak memory of one training step by part, in GiB (1024**3 bytes): ``utils.memory``'s analytic model.

    Exact for weights, LoRA parameters, gradients and optimiser states; an estimate for activations and
    logits. Meant to stop configurations that cannot fit before anything is loaded.
    """
    config = config if config is not None else load_model_config(settings.model_name)
    if plan.kbit_upcast:
        variant = "prepare"
    else:
        variant = "no_prepare_gc" if settings.gradient_checkpointing else "no_prepare"
    parts = analytic_training_breakdown(
        config,
        fmt=plan.quantization or plan.compute_dtype,
        variant=variant,
        compute_dtype=plan.compute_dtype,
        autocast=plan.fp16 or plan.bf16,
        max_seq_length=settings.max_seq_length,
        batch_size=settings.per_device_train_batch_size,
        r=settings.lora_r,
        optim=plan.optim,
    )
    return {f"{k}_gib": round(v / GIB, 3) for k, v in parts.items()}


def device_memory_gib(device: str | torch.device) -> float:
    """Memory of the device in GiB: the GPU's total memory, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return psutil.virtual_memory().available / GIB


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
            f"gradient_accumulation_steps to keep the effective batch, lower max_seq_length "
            f"({settings.max_seq_length}), set gradient_checkpointing=True, or quantization='nf4_dq'."
        )
    return estimate


# --------------------------------------------------------------------------------------------
# Model, configurations and trainer
# --------------------------------------------------------------------------------------------


def load_training_model(settings: TrainingSettings, plan: TrainingPlan):
    """Base model as the plan says (quantised or not, on the plan's device); the original upcast if asked.

    Under an emulated capability below 8.0 (``QLORA_EMULATE_CAPABILITY``) attention runs as a Turing GPU's would:
    SDPA without its FlashAttention and cuDNN kernels, and never FlashAttention-2.
    """
    switched_off = restrict_sdpa_to_capability(plan.device)
    if switched_off:
        plan.notes.append(f"capacidad emulada {plan.compute_capability}: scaled_dot_product_attention sin los "
                          f"backends {' ni '.join(switched_off)} (necesitan Ampere o más nueva).")
    model = load_model(
        settings.model_name, quantization=plan.quantization, device=plan.device,
        compute_dtype=torch_dtype(plan.compute_dtype),
    )
    plan.attn_implementation = check_attention_implementation(model, plan)
    if plan.kbit_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model


def check_attention_implementation(model, plan: TrainingPlan) -> str | None:
    """The model's attention implementation; FlashAttention on a GPU (or emulated one) older than Ampere stops."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if (implementation and "flash" in implementation and torch.device(plan.device).type == "cuda"
            and compute_capability(plan.device)[0] < 8):
        raise TrainingConfigError(
            f"the model was loaded with attn_implementation={implementation!r}, which needs compute capability "
            f"8.0 or newer; this run's GPU has {plan.compute_capability}. Load it with attn_implementation='sdpa'."
        )
    return implementation


def build_training_lora_config(settings: TrainingSettings) -> LoraConfig:
    """The thesis ``LoraConfig`` (seven modules) with this run's rank, alpha and dropout."""
    return build_lora_config(settings.lora_r, settings.lora_alpha, settings.lora_dropout)


def quiet_progress() -> bool:
    """Whether the trainer's text progress bar stays off: in a notebook (the live plot's title is the progress,
    and papermill would keep every redraw of the bar as raw text) and when stderr is a log file, not a terminal."""
    return in_notebook() or not sys.stderr.isatty()


def build_sft_config(settings: TrainingSettings, plan: TrainingPlan) -> SFTConfig:
    """``SFTConfig`` with every hyperparameter of the original set explicitly (TRL's defaults differ).

    Evaluation is on the validation split; with ``early_stopping_patience`` the best checkpoint (lowest
    validation loss) is loaded at the end and becomes the saved adapter. TensorBoard logs when it is installed.
    """
    early = settings.early_stopping_patience > 0
    return SFTConfig(
        output_dir=plan.checkpoints_dir,
        # data: TRL's defaults are max_length=1024 and, for prompt-completion data, completion-only loss
        max_length=settings.max_seq_length,
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
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=settings.seed,
        report_to=["tensorboard"] if plan.tensorboard_dir else "none",
        disable_tqdm=quiet_progress(),
        # pinned host memory only helps copies to a GPU; on a CPU torch warns that it is ignored
        dataloader_pin_memory=torch.device(plan.device).type == "cuda",
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
        self.pad_token_id = pad_token_id
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["labels"][batch["input_ids"] == self.pad_token_id] = -100
        return batch


def check_fast_path_model(settings: TrainingSettings, plan: TrainingPlan, model) -> None:
    """A model the fast path cannot run: an error for fast_path='on', the standard forward for 'auto'."""
    reason = unsupported_reason(model)
    if reason is None:
        return
    if settings.fast_path == "on":
        raise TrainingConfigError(f"fast_path='on' but {reason}. Set fast_path='auto' or 'off'.")
    plan.fast_path = False
    plan.per_device_train_batch_size = settings.per_device_train_batch_size
    plan.gradient_accumulation_steps = settings.gradient_accumulation_steps
    plan.notes.append(f"fast_path='auto' queda apagado: {reason}; este modelo se entrena con el forward estándar.")


def use_flat_optimizer(trainer, plan: TrainingPlan) -> bool:
    """With the fast path, bitsandbytes' 8-bit optimizer updates all LoRA tensors in one call (same numbers).

    The inner optimizer is the one the trainer resolves from ``SFTConfig.optim`` (its class and every
    hyperparameter: betas, eps, weight decay per group), so the update is the trainer's own.
    """
    if "8bit" not in plan.optim:
        return False
    reason = flat_unsupported_reason(p for p in trainer.model.parameters() if p.requires_grad)
    if reason:
        plan.notes.append(f"{plan.optim} actualiza tensor por tensor: {reason}.")
        return False
    inner_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    trainer.optimizer_cls_and_kwargs = (FlatOptimizer, {"inner_cls": inner_cls, **kwargs})
    plan.notes.append(f"{plan.optim} actualiza todos los tensores LoRA en una sola llamada "
                      "(utils.speed.optim.FlatOptimizer).")
    return True


def recast_trainable_parameters(model, dtype: torch.dtype = torch.float32) -> int:
    """Cast every trainable parameter to ``dtype`` (fp32 for fp16's gradient scaler); return how many."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count


def keep_trainable_dtypes(trainer) -> None:
    """A resumed run keeps each trainable tensor's dtype: restored just before the optimiser is built.

    ``Trainer.train(resume_from_checkpoint=...)`` reloads a PEFT checkpoint with ``load_adapter``, whose
    ``autocast_adapter_dtype=True`` upcasts bf16 adapter weights to fp32. TRL stores a 4-bit model's LoRA
    weights in bf16, so without this a run resumed under bf16 goes on with fp32 weights: another recipe than
    the run it continues (on an H200, validation loss 0.024-0.027 lower 400 steps after such a resume than the
    uninterrupted bf16 run of the same seed: ``results/04_resume_upcast_h200.json``). The
    checkpoint's values are kept (bf16 → fp32 → bf16 is exact); the optimiser, built after this, sees the
    parameters in the dtype its saved state was made for.

    Called again (after casting the parameters on purpose), it records the new dtypes instead of wrapping twice.
    """
    kept = {name: param.dtype for name, param in trainer.model.named_parameters() if param.requires_grad}
    wrapped = hasattr(trainer, "kept_trainable_dtypes")
    trainer.kept_trainable_dtypes = kept
    if wrapped:
        return
    create_optimizer = trainer.create_optimizer

    def create_optimizer_keeping_dtypes(*args, **kwargs):
        for name, param in trainer.model.named_parameters():
            dtype = trainer.kept_trainable_dtypes.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
        return create_optimizer(*args, **kwargs)

    trainer.create_optimizer = create_optimizer_keeping_dtypes


def trainable_dtypes(model) -> dict[str, int]:
    """Number of trainable parameters (elements) per dtype ("fp32", "bf16", ...)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = dtype_name(param.dtype)
            counts[key] = counts.get(key, 0) + param.numel()
    return counts


def _collator(plan: TrainingPlan, model, tokenizer):
    """The original's pad-masking collator, the fast path's padding-free one, or TRL's default (None)."""
    if plan.pad_is_eos:
        model.config.pad_token_id = tokenizer.pad_token_id
        return OriginalPadMaskingCollator(tokenizer.pad_token_id)
    if plan.fast_path:
        # One row of real tokens per micro-batch, positions restarting at 0 for each example. TRL's own
        # padding_free=True refuses max_length; the examples are truncated to max_length when tokenised.
        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return None


def _route_logs(trainer, plan: TrainingPlan) -> None:
    """TensorBoard's events into the run's ``04_tensorboard/``; no log dicts printed in a notebook.

    transformers 5 has no ``logging_dir``: its TensorBoard callback writes to ``output_dir/runs/<date_host>``
    (here the checkpoints folder) unless told a folder before training starts. With the text bar off,
    ``PrinterCallback`` would print every log as a dict; in a notebook the live plot shows them instead.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and plan.tensorboard_dir:
            callback.logging_dir = plan.tensorboard_dir
    if in_notebook():
        trainer.remove_callback(PrinterCallback)


def build_trainer(settings: TrainingSettings, plan: TrainingPlan, model, tokenizer, data: TrainingData,
                  callbacks: list | None = None) -> SFTTrainer:
    """``SFTTrainer(processing_class=..., peft_config=...)``; then the fp16 recast and the BOS check.

    Callbacks: the log history as CSV, the progress file, early stopping when asked, TensorBoard into
    ``04_tensorboard`` when installed, then ``callbacks``.
    """
    if plan.fast_path:
        check_fast_path_model(settings, plan, model)
    out = Path(plan.output_dir)
    own = [HistoryCsvCallback(out / HISTORY_FILE), ProgressFileCallback(out / PROGRESS_FILE)]
    if settings.early_stopping_patience:
        own.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(settings, plan),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=build_training_lora_config(settings),
        data_collator=_collator(plan, model, tokenizer),
        callbacks=[*own, *(callbacks or [])],
    )
    _route_logs(trainer, plan)
    if len(trainer.train_dataset) == 0:  # a sampler of 0 samples fails later as "num_samples should be positive"
        raise TrainingConfigError(
            f"no training example is left after tokenising {settings.train_file} with max_seq_length="
            f"{settings.max_seq_length} (train_limit={settings.train_limit}): raise max_seq_length or train_limit."
        )
    if plan.recast_trainable_fp32:
        recast_trainable_parameters(trainer.model, torch.float32)
    if plan.fast_path:
        fast = enable_fast_path(trainer.model, torch_dtype(plan.compute_dtype),
                                FastPathOptions(kernels=settings.fast_path_kernels))
        plan.fast_path_resolved = fast.describe()
        plan.notes.append(f"camino rápido resuelto: {plan.fast_path_resolved}")
        use_flat_optimizer(trainer, plan)
    keep_trainable_dtypes(trainer)
    check_bos(trainer.train_dataset, tokenizer)
    return trainer
