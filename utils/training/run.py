"""A training run: ``trainer.train()`` with checkpoints and resume, the saved outputs, the run config and record.

``train`` runs the whole of notebook 04 in its order (the command line and ``accelerate launch`` call it).
Everything goes to the run folder (``runs/<profile>/`` or ``output_dir``): ``04_checkpoints/checkpoint-N/``,
``04_adapter/`` (adapter safetensors + tokenizer), ``04_config.json``, ``04_log_history.csv``, ``04_run.json``.
``utils.inference.load_trained(run)`` loads the base model the way training did and puts the adapter on it.
"""

from __future__ import annotations

import enum
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import set_seed

from utils.files import save_json
from utils.memory.process import peak_rss_bytes
from utils.paths import ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE, HISTORY_FILE, run_dir
from utils.provenance import Stopwatch, result_provenance, write_run_record
from utils.training.callbacks import ThroughputCallback, history_frame, write_history
from utils.training.checkpoints import find_last_checkpoint, tokens_seen_at
from utils.training.data import load_training_data, load_training_tokenizer
from utils.training.model import (
    build_sft_config, build_trainer, build_training_lora_config, check_memory, load_training_model,
    trainable_dtypes,
)
from utils.training.lifecycle import (
    acquire_lock, checkpoint_dirs, is_finished_run, move_finished_run, output_errors, release_lock,
)
from utils.training.settings import (
    NOTEBOOK, RUN_FILE, TrainingConfigError, TrainingOutOfMemoryError, TrainingPlan, TrainingSettings,
    is_main_process, leftover_message, plan_training,
)
from utils.units import GIB

# --------------------------------------------------------------------------------------------
# The run config: parameters, plan, and the LoraConfig and SFTConfig objects as the run used them
# --------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with sets as sorted lists, tuples as lists, enums as their value, other objects as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def run_configs(settings: TrainingSettings, plan: TrainingPlan, trainer=None) -> tuple[Any, Any]:
    """(``LoraConfig``, ``SFTConfig``): the trainer's own objects when it exists, else built as it would build them."""
    peft_configs = getattr(getattr(trainer, "model", None), "peft_config", None) or {}
    lora = peft_configs.get("default") or build_training_lora_config(settings)
    sft = trainer.args if trainer is not None else build_sft_config(settings, plan)
    return lora, sft


def write_config(settings: TrainingSettings, plan: TrainingPlan, trainer=None) -> Path:
    """``04_config.json``: parameters, the resolved plan, the ``LoraConfig`` and ``SFTConfig``, provenance.

    Notebook 05 and ``utils.inference`` read ``model_name``, ``quantization``, ``compute_dtype``,
    ``replicate_original`` and ``parameters``; a resumed run checks its settings against ``parameters``.
    """
    lora, sft = run_configs(settings, plan, trainer)
    provenance = result_provenance()
    provenance["device_name"] = provenance.pop("device")  # "device" is the plan's torch device
    record: dict[str, Any] = {
        "notebook": NOTEBOOK,
        "model_name": settings.model_name,
        "quantization": plan.quantization,
        "compute_dtype": plan.compute_dtype,
        "replicate_original": settings.replicate_original,
        "device": plan.device,
        "parameters": settings.to_dict(),
        "plan": plan.to_dict(),
        "lora": json_safe(lora.to_dict()),
        "sft_config": json_safe(sft.to_dict()),
        **provenance,
    }
    return save_json(record, Path(plan.output_dir) / CONFIG_FILE)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def oom_message(settings: TrainingSettings, plan: TrainingPlan, error: BaseException) -> str:
    """The knobs that lower the peak memory, with their current values."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"out of memory during training on {plan.device} ({first}). Lower the peak with: "
        f"per_device_train_batch_size={settings.per_device_train_batch_size} → smaller (raise "
        f"gradient_accumulation_steps={settings.gradient_accumulation_steps} to keep the effective batch); "
        f"max_seq_length={settings.max_seq_length} → shorter; gradient_checkpointing="
        f"{settings.gradient_checkpointing} → True; per_device_eval_batch_size={settings.per_device_eval_batch_size} "
        f"→ 1; quantization={plan.quantization!r} → 'nf4_dq'. Checkpoints so far are in {plan.checkpoints_dir}: "
        "rerun (resume='auto', the default, continues from the last one) after changing only "
        "batch/accumulation-free knobs."
    )


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory (CUDA's error, or the CPU allocator's)."""
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
        return torch.cuda.max_memory_allocated(device) / GIB
    return peak_rss_bytes() / GIB


def claim_output_dir(settings: TrainingSettings, plan: TrainingPlan) -> None:
    """Take the folder's lock; a new run first moves a finished run to ``previous/`` and finds no checkpoint.

    Checked again here, under the lock, because the folder may have changed since ``plan_training``: the
    trainer's rotation (``save_total_limit``) would delete checkpoints another run left there.
    """
    out = Path(plan.output_dir)
    acquire_lock(out)
    if plan.resume_from is not None:
        return
    if is_finished_run(out):
        moved = move_finished_run(out)
        print(f"la corrida terminada que estaba en {out} ahora está en {moved} (se movió, no se borró nada)")
    leftovers = checkpoint_dirs(out)
    if leftovers:
        raise TrainingConfigError(
            leftover_message(settings, out, leftovers, find_last_checkpoint(out / CHECKPOINTS_DIR)))


def _prepare_run(trainer, settings: TrainingSettings, plan: TrainingPlan) -> None:
    """The folder claimed (lock, finished run kept aside), the config written first, the seed, peak memory."""
    if is_main_process():
        claim_output_dir(settings, plan)
        write_config(settings, plan, trainer)  # before training: a resumed run checks against it
    # The sampler draws from the global generator: the same order whatever ran before this cell.
    set_seed(settings.seed)
    if torch.device(plan.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)


def _first_last(history: pd.DataFrame, column: str) -> tuple[float | None, float | None]:
    """First and last logged value of a column of the log history (None, None when never logged)."""
    values = history[column].dropna() if column in history else []
    return (float(values.iloc[0]), float(values.iloc[-1])) if len(values) else (None, None)


def best_validation(history: pd.DataFrame) -> tuple[int | None, float | None]:
    """(step, loss) of the lowest validation loss logged; (None, None) without an evaluation."""
    if "eval_loss" not in history or history["eval_loss"].dropna().empty:
        return None, None
    row = history.loc[history["eval_loss"].idxmin()]
    return int(row["step"]), float(row["eval_loss"])


def training_result(trainer, plan: TrainingPlan, output, seconds: float, tokens_before: int,
                    throughput: ThroughputCallback) -> dict[str, Any]:
    """Steps, wall time, tokens/s (non-padding tokens of this session), peak memory and losses of a run.

    ``eval`` = the validation split. ``adapter_step``: the step whose weights are saved (the best checkpoint's
    under early stopping, which loads it at the end; else the last step).
    """
    state = trainer.state
    history = history_frame(state.log_history)
    tokens = state.num_input_tokens_seen - tokens_before
    first_train, last_train = _first_last(history, "loss")
    first_eval, last_eval = _first_last(history, "eval_loss")
    best_step, best_loss = best_validation(history)
    loads_best = bool(getattr(trainer.args, "load_best_model_at_end", False)) and bool(state.best_model_checkpoint)
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
        "peak_memory_kind": ("max_memory_allocated" if torch.device(plan.device).type == "cuda"
                             else "peak RSS of the process"),
        "first_train_loss": first_train,
        "last_train_loss": last_train,
        "first_eval_loss": first_eval,
        "last_eval_loss": last_eval,
        "best_eval_step": best_step,
        "best_eval_loss": best_loss,
        "max_steps": state.max_steps,
        "stopped_early": state.global_step < state.max_steps,
        "adapter_step": (getattr(state, "best_global_step", None) or best_step) if loads_best else state.global_step,
        "trainable_dtypes": trainable_dtypes(trainer.model),
    }


def run_training(trainer, settings: TrainingSettings, plan: TrainingPlan) -> dict[str, Any]:
    """``trainer.train()`` (from the last checkpoint when resuming); OOM, a full or read-only disk: one error.

    Holds the folder's lock (``04_training.lock``) from here until ``save_training_outputs`` (or until an error).
    Returns steps, wall time, tokens/s (non-padding tokens of this session), peak memory and losses.
    """
    try:
        with output_errors(plan.output_dir):
            _prepare_run(trainer, settings, plan)
            tokens_before = tokens_seen_at(plan.resume_from)
            throughput = ThroughputCallback()
            if hasattr(trainer, "add_callback"):
                trainer.add_callback(throughput)
            start = time.perf_counter()
            try:
                output = trainer.train(resume_from_checkpoint=plan.resume_from)
            except Exception as error:  # noqa: BLE001 - only OOM is translated, the rest re-raised as is
                if is_oom(error):
                    raise TrainingOutOfMemoryError(oom_message(settings, plan, error)) from None
                raise
            seconds = time.perf_counter() - start
    except BaseException:
        if is_main_process():
            release_lock(plan.output_dir)
        raise
    return training_result(trainer, plan, output, seconds, tokens_before, throughput)


# --------------------------------------------------------------------------------------------
# Outputs and the run record
# --------------------------------------------------------------------------------------------


def save_training_outputs(trainer, tokenizer, settings: TrainingSettings, plan: TrainingPlan,
                          release: bool = True) -> dict[str, Path]:
    """Adapter (safetensors) + tokenizer in ``04_adapter/``, ``04_config.json``, ``04_log_history.csv``.

    A new run's ``04_adapter/`` is empty (a finished run was moved to ``previous/``); a resumed run rewrites its
    own. Then the folder's lock is released (``release=False`` keeps it, for ``train`` to write ``04_run.json``).
    """
    out = Path(plan.output_dir)
    adapter = out / ADAPTER_DIR
    try:
        with output_errors(out):
            trainer.save_model(str(adapter))  # PEFT model: adapter_model.safetensors + adapter_config.json
            paths = {"adapter": adapter}
            if trainer.is_world_process_zero():
                tokenizer.save_pretrained(adapter)
                paths["config"] = write_config(settings, plan, trainer)
                paths["history"] = write_history(trainer.state.log_history, out / HISTORY_FILE)
    finally:
        if release and trainer.is_world_process_zero():
            release_lock(out)
    return paths


def load_history(output_dir: str | Path) -> pd.DataFrame:
    """The saved log history (``04_log_history.csv``) of a run."""
    return pd.read_csv(Path(output_dir) / HISTORY_FILE)


def write_training_record(settings: TrainingSettings, training_plan: TrainingPlan, stopwatch: Stopwatch,
                          **results: Any) -> Path:
    """``04_run.json`` in the run's folder (``utils.provenance.write_run_record`` for the profile folder)."""
    out = Path(training_plan.output_dir)
    with output_errors(out):
        if out.resolve() == run_dir(settings.profile).resolve():
            return write_run_record(NOTEBOOK, settings.profile, settings.to_dict(), stopwatch, **results)
        record = {
            "notebook": NOTEBOOK, "profile": settings.profile, "parameters": settings.to_dict(),
            "started_at": stopwatch.started_at, "wall_time_s": stopwatch.seconds, **result_provenance(), **results,
        }
        return save_json(record, out / RUN_FILE)


def train(settings: TrainingSettings, callbacks: list | None = None, verbose: bool = True,
          keep_trl_bf16_adapters: bool = False) -> dict[str, Any]:
    """The whole run, in the notebook's order: plan → data → memory check → model → trainer → train → save.

    ``keep_trl_bf16_adapters`` skips the fp16 recast, to show the gradient-scaler error it prevents.
    """
    stopwatch = Stopwatch()
    plan = plan_training(settings)
    if keep_trl_bf16_adapters:
        plan.recast_trainable_fp32 = False
        plan.notes.append("--keep-trl-bf16-adapters: the trainable parameters stay as TRL leaves them.")
    for note in plan.notes:
        print(f"note: {note}")
    tokenizer = load_training_tokenizer(settings, plan)
    data = load_training_data(settings, plan, tokenizer)
    for note in data.notes:  # cut answers, added system prompts, acknowledged leaks
        print(f"note: {note}")
    estimate = check_memory(settings, plan)
    model = load_training_model(settings, plan)
    trainer = build_trainer(settings, plan, model, tokenizer, data, callbacks)
    try:
        result = run_training(trainer, settings, plan)
        save_training_outputs(trainer, tokenizer, settings, plan, release=False)
        result["memory_estimate_gib"] = estimate
        if trainer.is_world_process_zero():
            write_training_record(settings, plan, stopwatch, plan=plan.to_dict(), training=result)
    finally:
        if is_main_process():
            release_lock(plan.output_dir)
    if verbose and trainer.is_world_process_zero():
        print(success_line(settings, plan, result))
    return result


def success_line(settings: TrainingSettings, plan: TrainingPlan, result: dict[str, Any]) -> str:
    """One line that says the run finished, with what a reader checks first."""
    dtypes = ", ".join(f"{k}: {v:,}" for k, v in result["trainable_dtypes"].items())
    scaler = " fp16 + gradient scaler OK;" if plan.fp16 else ""
    early = (f" (stopped early; adapter = best step {result['adapter_step']})"
             if result.get("stopped_early") and settings.early_stopping_patience else "")
    return (
        f"TRAINING OK:{scaler} {result['global_step']} steps on {plan.device} "
        f"(model={settings.model_name}, quantization={plan.quantization}, compute={plan.compute_dtype}, "
        f"optim={plan.optim}); trainable params {dtypes}; train loss {result['first_train_loss']} → "
        f"{result['last_train_loss']}, validation loss {result['first_eval_loss']} → {result['last_eval_loss']}"
        f"{early}; "
        f"{result['tokens_per_second']} tokens/s; peak {result['peak_memory_gib']} GiB; adapter in "
        f"{Path(plan.output_dir) / ADAPTER_DIR}"
    )
