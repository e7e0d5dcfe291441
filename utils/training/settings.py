"""The parameters of notebook 04 (``TrainingSettings``) and what they resolve to on this machine (``TrainingPlan``).

``plan_training`` resolves every ``auto`` value, checks the settings (one error naming the setting and the fix)
and says in notes what differs from the original script and why.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from utils.config import HUB_MODEL_ID, THESIS, coerce_value
from utils.device import (
    DTYPES, EMULATE_CAPABILITY_ENV, CapabilityEmulationError, compute_capability, default_device, dtype_name,
    emulated_capability, pick_compute_dtype, real_capability,
)
from utils.files import read_json
from utils.paths import CHECKPOINTS_DIR, CONFIG_FILE, RUNS_DIR, TENSORBOARD_DIR, resolve_path
from utils.speed import FastPathOptions
from utils.speed.fastpath import KERNEL_CHOICES, liger_available
from utils.training.checkpoints import find_last_checkpoint
from utils.training.errors import (  # noqa: F401 - the errors are imported from here too
    TrainingConfigError, TrainingOutOfMemoryError, TrainingOutputError,
)
from utils.training.lifecycle import (
    check_not_locked, check_writable, checkpoint_dirs, is_finished_run, previous_run_dir,
)

NOTEBOOK = "04"
RUN_FILE = "04_run.json"

RESUME_CHOICES = ("auto", True, False)
QUANTIZATION_CHOICES = ("auto", "none", "fp32", "fp16", "bf16", "int8", "fp4", "nf4", "nf4_dq")
BNB_QUANTIZATIONS = ("int8", "fp4", "nf4", "nf4_dq")
FAST_PATH_CHOICES = ("auto", "on", "off")
FAST_PATH_KERNEL_CHOICES = KERNEL_CHOICES  # "auto" | "liger" | "torch" (utils.speed.fastpath.FastPathOptions.kernels)
SAMPLING_CHOICES = ("auto", "random", "group_by_length")

# Settings that no longer exist, each with the message that says where it went (a profile block, a notebook
# parameter injected by papermill or ``TrainingSettings(...)`` with the old name stops with it).
RENAMED_SETTINGS = {
    "test_file": (
        "test_file is no longer a training setting: every evaluation during training, the stop-rate check and "
        "early stopping use validation_file (default dataset/utn_sample_validation.jsonl), and the test split is "
        "read by notebook 05 only. Rename test_file to validation_file in notebook 04's parameters or in the "
        "profile's \"04\" block (--validation-file on the command line), and set test_file for notebook 05 only."
    ),
}

# Parameters of notebook 04 that are not training settings (the stop-rate measurement after training, the
# allocator cap that stands in for a smaller GPU).
NOTEBOOK_ONLY = ("stop_examples", "stop_max_new_tokens", "gpu_memory_cap_gib")

# Settings a resumed run must share with the run that wrote the checkpoint: they change the maths.
RESUME_MUST_MATCH = (
    "model_name", "quantization", "compute_dtype", "train_file", "train_limit", "max_seq_length", "lora_r",
    "lora_alpha", "lora_dropout", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "lr_scheduler_type",
    "optim", "replicate_original", "train_sampling_strategy", "seed",
)

# Settings that must be at least 1.
POSITIVE_SETTINGS = ("max_seq_length", "lora_r", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_steps", "per_device_eval_batch_size", "eval_steps", "logging_steps", "save_steps",
                     "save_total_limit")
# Settings that must be 0 or more (0 = every example, no warm-up, no decay, the device's memory).
NON_NEGATIVE_SETTINGS = ("train_limit", "eval_limit", "warmup_steps", "weight_decay", "memory_budget_gib",
                         "early_stopping_patience")
SCHEDULERS = tuple(s.value for s in SchedulerType)
OPTIMIZERS = tuple(o.value for o in OptimizerNames)
# The optimizers worth naming in a message (TrainingArguments accepts every name of ``OPTIMIZERS``).
USUAL_OPTIMIZERS = ("paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_32bit",
                    "adafactor", "sgd")


@dataclass
class TrainingSettings:
    """The parameters of notebook 04. Defaults = the original ``train_peft_v3.py`` (the thesis run)."""

    profile: str = "thesis"
    model_name: str = HUB_MODEL_ID
    quantization: str = "auto"  # "auto": nf4_dq on CUDA, none (fp32) on the CPU
    compute_dtype: str = "auto"  # "auto": bf16 from compute capability 8.0, fp16 below, fp32 on the CPU
    train_file: str = "dataset/utn_sample_train.jsonl"
    validation_file: str = "dataset/utn_sample_validation.jsonl"  # every evaluation during training
    train_limit: int = 0  # 0 = every training example
    eval_limit: int = 0  # 0 = every validation example
    max_seq_length: int = THESIS.max_seq_length
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
    early_stopping_patience: int = 0  # 0 = off; n = stop after n evaluations without a lower validation loss
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 3
    gradient_checkpointing: bool = True
    fast_path: str = "auto"  # "auto": utils.speed's fast path on a CUDA GPU unless replicating the original
    # The fast path's RMSNorm/RoPE/SwiGLU: "auto" (Triton kernels of Liger and utils.speed.kernels for passes of
    # 4096 tokens or more, PyTorch ops for smaller ones), "torch" (PyTorch ops always: what a machine without
    # Triton runs, e.g. Windows), "liger" (Triton kernels always)
    fast_path_kernels: str = "auto"
    replicate_original: bool = False
    train_sampling_strategy: str = "auto"  # "auto": group_by_length when replicating the original, else random
    allow_split_overlap: bool = False  # True: train although train and validation share questions
    allow_dropping_long_examples: bool = False  # True: drop examples whose prompt fills max_seq_length
    resume: bool | str = "auto"  # "auto": continue an unfinished run of the same settings; True; False
    seed: int = 42
    output_dir: str = ""  # "" = runs/<profile>
    memory_budget_gib: float = 0.0  # 0 = the device's memory; e.g. 8.0 for the RTX 2070 SUPER

    def __post_init__(self) -> None:
        """Each value as its field's type (``learning_rate="1e-4"`` → 1e-4); one error naming the setting."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "resume":
                if value not in RESUME_CHOICES or not isinstance(value, (bool, str)):
                    raise TrainingConfigError(f"resume={value!r}: use 'auto', True or False.")
                continue
            try:
                setattr(self, f.name, coerce_value(value, f.default))
            except ValueError as exc:
                raise TrainingConfigError(f"{f.name}={value!r}: {exc} (default {f.default!r}).") from None

    @classmethod
    def from_parameters(cls, namespace: dict[str, Any]) -> "TrainingSettings":
        """Pick the settings by name from a notebook's parameters (``globals()``) or a profile block.

        A setting that was renamed (``test_file``) stops with the message that says where it went.
        """
        check_renamed(namespace)
        return cls(**{k: v for k, v in namespace.items() if k in setting_names()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def setting_names() -> set[str]:
    """The names of ``TrainingSettings``' fields."""
    return {f.name for f in dataclasses.fields(TrainingSettings)}


def check_renamed(names: Any) -> None:
    """One ``TrainingConfigError`` for a setting that no longer exists (``test_file``), saying where it went."""
    for old, message in RENAMED_SETTINGS.items():
        if old in names:
            raise TrainingConfigError(message)


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
    fast_path: bool  # utils.speed's fast path: fused layers, offloaded checkpoints, padding-free batches
    per_device_train_batch_size: int  # the fast path runs batch x accumulation as one padding-free micro-batch
    gradient_accumulation_steps: int
    output_dir: str
    checkpoints_dir: str
    resume_from: str | None
    notes: list[str] = field(default_factory=list)
    previous_run: str | None = None  # where the finished run in output_dir moves before this one writes
    tensorboard_dir: str | None = None  # TensorBoard event files (None: tensorboard is not installed)
    # The GPU's compute capability as the run's decisions saw it ("7.5"), and the GPU's own when it is emulated
    # (QLORA_EMULATE_CAPABILITY); None on the CPU
    compute_capability: str | None = None
    emulated_from: str | None = None
    # transformers' attention in the loaded model ("sdpa"; the fast path's own attention is in fast_path_resolved)
    attn_implementation: str | None = None
    # What the fast path resolved to once the model exists (kernels, attention, dtypes): FastPath.describe()
    fast_path_resolved: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun`` (the one that writes files), or a plain process."""
    return int(os.environ.get("RANK", 0)) == 0


def output_dir_of(settings: TrainingSettings) -> Path:
    """Folder of a run's outputs: ``output_dir`` when set, else ``runs/<profile>`` (not created here)."""
    return resolve_path(settings.output_dir) if settings.output_dir else RUNS_DIR / settings.profile


def plan_training(settings: TrainingSettings, device: str | torch.device | None = None) -> TrainingPlan:
    """Resolve ``auto`` values, check the settings and say what differs from the original and why."""
    device = torch.device(device) if device is not None else default_device()
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    check_values(settings)
    capability, emulated_from = _capability(device, notes)
    quantization = _resolve_quantization(settings.quantization, on_cuda, notes)
    compute = _resolve_compute_dtype(settings.compute_dtype, device)
    optim = _resolve_optim(settings.optim, on_cuda, notes)
    original = settings.replicate_original
    quantized = quantization in BNB_QUANTIZATIONS
    _note_original_and_fp16(original, quantized, compute == "fp16", notes)
    fast = _resolve_fast_path(settings, on_cuda, quantization, original, notes)
    batch, accumulation = _micro_batches(settings, fast, notes)
    out = output_dir_of(settings)
    checkpoints = out / CHECKPOINTS_DIR
    check_writable(out)
    if is_main_process():  # the other ranks of a DDP run see rank 0's lock
        check_not_locked(out)
    resume_from, previous = _resume_point(settings, out, notes)
    tensorboard = _tensorboard_dir(out, notes)
    return TrainingPlan(
        device=str(device),
        quantization=quantization,
        compute_dtype=compute,
        fp16=compute == "fp16",
        bf16=compute == "bf16",
        optim=optim,
        loss="full_text" if original else "completion_only",
        pad_is_eos=original,
        train_sampling_strategy=_resolve_sampling(settings.train_sampling_strategy, original),
        kbit_upcast=original and quantized,
        recast_trainable_fp32=compute == "fp16",
        fast_path=fast,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        output_dir=str(out),
        checkpoints_dir=str(checkpoints),
        resume_from=str(resume_from) if resume_from else None,
        notes=notes,
        previous_run=str(previous) if previous else None,
        tensorboard_dir=tensorboard,
        compute_capability=capability,
        emulated_from=emulated_from,
    )


def _capability(device: torch.device, notes: list[str]) -> tuple[str | None, str | None]:
    """("7.5", "9.0") under ``QLORA_EMULATE_CAPABILITY=7.5`` on an H200, ("9.0", None) without; a bad one stops.

    (None, None) off CUDA, and for a CUDA device planned on a machine without one.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        try:
            emulated = emulated_capability()
        except CapabilityEmulationError as exc:
            raise TrainingConfigError(str(exc)) from None
        if emulated is not None:
            notes.append(f"{EMULATE_CAPABILITY_ENV}={'.'.join(map(str, emulated))} no tiene efecto en {device}: "
                         "solo se emula la capacidad de cómputo de una GPU CUDA.")
        return None, None
    try:
        used, real = compute_capability(device), real_capability(device)
    except CapabilityEmulationError as exc:
        raise TrainingConfigError(str(exc)) from None
    text, real_text = ".".join(map(str, used)), ".".join(map(str, real))
    if used == real and emulated_capability() is None:
        return text, None
    notes.append(
        f"{EMULATE_CAPABILITY_ENV}={text}: {torch.cuda.get_device_name(device)} (capacidad {real_text}) toma las "
        f"decisiones de una GPU de capacidad {text}"
        + (": fp16 en lugar de bf16 y atención SDPA sin FlashAttention (como una RTX 20xx)." if used[0] < 8 else ".")
    )
    return text, real_text


def _tensorboard_dir(out: Path, notes: list[str]) -> str | None:
    """``<run>/04_tensorboard`` when tensorboard imports (``report_to=["tensorboard"]``), else None and a note."""
    if is_tensorboard_available():
        return str(out / TENSORBOARD_DIR)
    notes.append("TensorBoard no está instalado: el historial queda en 04_log_history.csv y en la curva en vivo "
                 "(pip install tensorboard para tener también los registros de TensorBoard).")
    return None


def _resolve_sampling(choice: str, original: bool) -> str:
    """``auto``: the original's length-grouped batches when replicating it, random batches otherwise."""
    if choice != "auto":
        return choice
    return "group_by_length" if original else "random"


def _resolve_quantization(choice: str, on_cuda: bool, notes: list[str]) -> str | None:
    """``auto``: nf4_dq on a GPU (the original), no quantisation (fp32) on the CPU; ``none`` → None."""
    if choice != "auto":
        return None if choice == "none" else choice
    if on_cuda:
        return "nf4_dq"
    notes.append(
        "quantization='auto' en CPU: modelo base en fp32 + LoRA (bitsandbytes también cuantiza a 4 bits en CPU, "
        "pero más lento); en GPU 'auto' es nf4_dq, como en el original."
    )
    return None


def _resolve_compute_dtype(choice: str, device: torch.device) -> str:
    """``auto``: bf16 from compute capability 8.0, fp16 below, fp32 on the CPU; a dtype the device lacks fails."""
    compute = dtype_name(pick_compute_dtype(device)) if choice == "auto" else choice
    on_cuda = device.type == "cuda"
    if compute in {"fp16", "bf16"} and not on_cuda:
        raise TrainingConfigError(
            f"compute_dtype={compute!r} needs a CUDA GPU (mixed precision with a gradient scaler); this "
            "machine has none. Set compute_dtype='auto' (fp32 on the CPU)."
        )
    if compute == "bf16" and on_cuda and compute_capability(device)[0] < 8:
        emulated = (f" ({EMULATE_CAPABILITY_ENV} emulates it; unset it to use the GPU's own)"
                    if emulated_capability() is not None else "")
        raise TrainingConfigError(
            f"compute_dtype='bf16' needs compute capability 8.0 or newer; {torch.cuda.get_device_name(device)} "
            f"has {'.'.join(map(str, compute_capability(device)))}{emulated}. Set compute_dtype='fp16' or 'auto'."
        )
    return compute


def _resolve_optim(optim: str, on_cuda: bool, notes: list[str]) -> str:
    """bitsandbytes' paged 8-bit optimisers need CUDA: ``adamw_torch`` on the CPU."""
    if on_cuda or ("8bit" not in optim and "paged" not in optim):
        return optim
    notes.append(f"optim={optim!r} necesita CUDA (estados paginados de 8 bits de bitsandbytes): en CPU se usa "
                 "'adamw_torch'.")
    return "adamw_torch"


def _note_original_and_fp16(original: bool, quantized: bool, fp16: bool, notes: list[str]) -> None:
    """Notes on what ``replicate_original`` restores and on the fp16 recast of a 4-bit model's adapters."""
    if original:
        notes.append(
            "replicate_original=True: pérdida sobre todo el texto (prompt incluido), pad = eos (con la etiqueta "
            "de cada eos enmascarada, como hacía el collator viejo), lotes agrupados por longitud"
            + (", upcast de prepare_model_for_kbit_training" if quantized else "")
            + "."
        )
    if fp16 and quantized:
        notes.append(
            "fp16 sobre un modelo de 4 bits: TRL pasa los parámetros LoRA entrenables a bf16, que el escalador de "
            "gradientes de fp16 no puede desescalar; se devuelven a fp32 después de construir el trainer."
        )


def _resolve_fast_path(settings: TrainingSettings, on_cuda: bool, quantization: str | None, original: bool,
                       notes: list[str]) -> bool:
    """Whether the fast path runs: "auto" = on a CUDA GPU, 4-bit or 16-bit weights, not the original."""
    choice = settings.fast_path
    if choice == "off":
        return False
    blockers = []  # (English for the error, Spanish for the note)
    if original:
        blockers.append(("replicate_original=True trains the original configuration",
                         "replicate_original=True entrena la configuración original"))
    if quantization == "int8":
        blockers.append(("quantization='int8' (the fast path dequantises nf4/fp4 or reads 16-bit weights)",
                         "quantization='int8' (el camino rápido descuantiza nf4/fp4 o lee pesos de 16 bits)"))
    if choice == "on":
        if blockers:
            raise TrainingConfigError(f"fast_path='on' but {'; '.join(b[0] for b in blockers)}. "
                                      "Set fast_path='auto' or 'off'.")
        _check_kernels(settings.fast_path_kernels, on_cuda)
        return True
    if not on_cuda:
        return False
    if blockers:
        notes.append(f"fast_path='auto' queda apagado: {'; '.join(b[1] for b in blockers)}.")
        return False
    _check_kernels(settings.fast_path_kernels, on_cuda)
    notes.append(
        "camino rápido (utils.speed): q/k/v y gate/up como una sola multiplicación cada una (con sus LoRA "
        f"fusionadas), sin upcast a fp32, checkpoints en memoria fijada de la CPU, {_kernels_note(settings)} y "
        "lotes sin relleno; fast_path='off' usa el forward estándar de transformers + PEFT."
    )
    return True


def _check_kernels(choice: str, on_cuda: bool) -> None:
    """``fast_path_kernels='liger'`` where Liger's Triton kernels cannot run: one error with the way out."""
    if choice == "liger" and not (on_cuda and liger_available()):
        raise TrainingConfigError(
            "fast_path_kernels='liger' needs a CUDA GPU with Triton and the liger-kernel package "
            "(pip install liger-kernel); set fast_path_kernels='auto' (Triton where it runs, PyTorch ops elsewhere) "
            "or 'torch'."
        )


def _kernels_note(settings: TrainingSettings) -> str:
    """The fast path's kernels in Spanish, for the plan's note."""
    triton = "kernels de Triton (RMSNorm/SwiGLU de Liger, RoPE de utils.speed.kernels)"
    if settings.fast_path_kernels == "torch":
        return "operaciones de PyTorch en lugar de kernels de Triton (fast_path_kernels='torch', como en Windows)"
    if settings.fast_path_kernels == "liger":
        return f"{triton} en todas las pasadas (fast_path_kernels='liger')"
    if not liger_available():
        return "operaciones de PyTorch (Triton o liger-kernel no están instalados)"
    return f"{triton} en pasadas de {FastPathOptions().small_pass_tokens} tokens o más"


def _micro_batches(settings: TrainingSettings, fast: bool, notes: list[str]) -> tuple[int, int]:
    """(micro-batch, accumulation): the fast path runs batch x accumulation as one padding-free micro-batch."""
    batch, accumulation = settings.per_device_train_batch_size, settings.gradient_accumulation_steps
    if not fast or accumulation <= 1:
        return batch, accumulation
    notes.append(
        f"camino rápido: los {batch} x {accumulation} micro-lotes corren como un único micro-lote sin relleno de "
        f"{batch * accumulation} secuencias (las mismas secuencias y la misma pérdida por paso del optimizador, un "
        "forward/backward en lugar de varios)."
    )
    return batch * accumulation, 1


def _resume_point(settings: TrainingSettings, out: Path, notes: list[str]) -> tuple[Path | None, Path | None]:
    """(checkpoint to continue from, where a finished run moves first); stops rather than lose a checkpoint.

    ``resume="auto"`` continues an unfinished run whose settings match; ``True`` also continues a finished one;
    a new run into a folder holding a finished run first moves that run to ``previous/<date>/``. Leftover
    checkpoints of an unfinished run that this run would not continue stop it with the ways out.
    """
    last = find_last_checkpoint(out / CHECKPOINTS_DIR)
    if is_finished_run(out) and not (settings.resume is True and last is not None):
        previous = previous_run_dir(out)
        notes.append(f"{out} tiene una corrida terminada: pasa a {previous} antes de que esta corrida escriba nada.")
        return None, previous
    leftovers = checkpoint_dirs(out)
    if settings.resume is False or (leftovers and last is None):
        if leftovers:
            raise TrainingConfigError(leftover_message(settings, out, leftovers, last))
        return None, None
    if last is None:
        if settings.resume is True:
            notes.append(f"resume=True pero {out / CHECKPOINTS_DIR} no tiene checkpoints: se empieza en el paso 0.")
        return None, None
    check_resume_matches(settings, out)
    notes.append(f"resume={settings.resume!r}: se continúa desde {last.name} de la corrida sin terminar en {out}.")
    return last, None


def leftover_message(settings: TrainingSettings, out: Path, leftovers: list[Path], last: Path | None) -> str:
    """Checkpoints of an unfinished run that this run would not continue: how to resume it or start over."""
    names = ", ".join(p.name for p in leftovers)
    if last is None:
        why = (f"{out / CHECKPOINTS_DIR} holds checkpoints cut off before they were complete ({names}): there is "
               "nothing to resume")
        resume = ""
    else:
        why = (f"resume={settings.resume!r}, but {out / CHECKPOINTS_DIR} holds the checkpoints of an unfinished "
               f"run ({names})")
        resume = "To continue it, set resume='auto' (or True; --resume on the command line). "
    return (f"{why}, and a new run there would rotate them away. {resume}To start over, set resume=False with "
            f"a new output_dir, or move {out} away first (e.g. mv {out} {out}-old).")


def check_values(s: TrainingSettings) -> None:
    """One clear error for a setting out of range: the setting, its value and what is allowed."""
    choices = {"quantization": QUANTIZATION_CHOICES, "compute_dtype": ("auto", *DTYPES),
               "fast_path": FAST_PATH_CHOICES, "fast_path_kernels": FAST_PATH_KERNEL_CHOICES,
               "lr_scheduler_type": SCHEDULERS,
               "train_sampling_strategy": SAMPLING_CHOICES}
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            raise TrainingConfigError(f"{name}={getattr(s, name)!r}: use one of {', '.join(allowed)}.")
    if s.optim not in OPTIMIZERS:
        raise TrainingConfigError(
            f"optim={s.optim!r} is not an optimizer TrainingArguments knows. Usual ones: "
            f"{', '.join(USUAL_OPTIMIZERS)} (all {len(OPTIMIZERS)}: transformers.training_args.OptimizerNames)."
        )
    for name in POSITIVE_SETTINGS:
        if getattr(s, name) < 1:
            raise TrainingConfigError(f"{name}={getattr(s, name)}: must be an integer of 1 or more.")
    for name in NON_NEGATIVE_SETTINGS:
        if getattr(s, name) < 0:
            raise TrainingConfigError(f"{name}={getattr(s, name)}: must be 0 or more.")
    ranges = [
        ("lora_alpha", s.lora_alpha > 0, "must be above 0 (LoRA's scale is lora_alpha / lora_r; 0 learns nothing)"),
        ("lora_dropout", 0 <= s.lora_dropout < 1, "must be in [0, 1) (1 drops every input of the adapters)"),
        ("learning_rate", 0 < s.learning_rate < 1, "must be in (0, 1); the thesis uses 1e-4"),
        ("max_grad_norm", s.max_grad_norm > 0, "must be above 0 (the clipping norm; the thesis uses 0.5)"),
        ("seed", 0 <= s.seed < 2**32, "must be in [0, 2**32 - 1] (numpy's seed range); the original used 42"),
    ]
    for name, ok, allowed in ranges:
        if not ok:
            raise TrainingConfigError(f"{name}={getattr(s, name)}: {allowed}.")
    if not s.model_name or not s.train_file or not s.validation_file:
        empty = next(n for n in ("model_name", "train_file", "validation_file") if not getattr(s, n))
        raise TrainingConfigError(f"{empty}='': name a model or file.")
    if s.warmup_steps >= s.max_steps:
        raise TrainingConfigError(
            f"warmup_steps={s.warmup_steps} is not below max_steps={s.max_steps}: the learning rate would "
            "never leave the warm-up. Lower warmup_steps or raise max_steps."
        )
    check_early_stopping(s)


def check_early_stopping(s: TrainingSettings) -> None:
    """Early stopping keeps the best checkpoint: it must be saved at an evaluation, and kept besides the last.

    transformers loads the best checkpoint at the end (``load_best_model_at_end``), which needs every save at an
    evaluation step (``save_steps`` a multiple of ``eval_steps``); its rotation then always keeps the best
    checkpoint and the latest one, and with ``save_total_limit=1`` it deletes the latest one when training ends.
    So ``save_total_limit`` must be at least 2: the folder then holds the best, the latest and (up to the limit)
    the most recent others, and no checkpoint is deleted that the limit did not ask for.
    """
    if not s.early_stopping_patience:
        return
    if s.save_steps % s.eval_steps:
        raise TrainingConfigError(
            f"early_stopping_patience={s.early_stopping_patience} keeps the checkpoint with the lowest validation "
            f"loss, so checkpoints must be written at evaluations: save_steps={s.save_steps} is not a multiple of "
            f"eval_steps={s.eval_steps}. Set save_steps to a multiple of eval_steps (e.g. {s.eval_steps})."
        )
    if s.save_total_limit < 2:
        raise TrainingConfigError(
            f"early_stopping_patience={s.early_stopping_patience} with save_total_limit={s.save_total_limit}: "
            "transformers keeps the best checkpoint besides the latest and, with a limit of 1, deletes the latest "
            "when training ends. Set save_total_limit to 2 or more."
        )


def resume_mismatches(settings: TrainingSettings, out: Path) -> dict[str, tuple[Any, Any]]:
    """The settings of ``RESUME_MUST_MATCH`` that differ from the run that wrote the checkpoints: (then, now)."""
    config_path = out / CONFIG_FILE
    if not config_path.is_file():
        return {}
    saved = read_json(config_path).get("parameters", {})
    current = settings.to_dict()
    return {k: (saved[k], current[k]) for k in RESUME_MUST_MATCH if k in saved and saved[k] != current[k]}


def check_resume_matches(settings: TrainingSettings, out: Path) -> None:
    """Refuse to resume a checkpoint written with other hyperparameters (it would mix two runs)."""
    diff = resume_mismatches(settings, out)
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {then!r} vs now {now!r}" for k, (then, now) in diff.items())
        raise TrainingConfigError(
            f"resume={settings.resume!r}, but the checkpoints in {out / CHECKPOINTS_DIR} come from an unfinished "
            f"run with other settings ({pairs}). To continue it, use its settings. To start over, set "
            f"resume=False with a new output_dir, or move {out} away first (e.g. mv {out} {out}-old)."
        )
