"""The original script's hyperparameters (the thesis defaults) and the papermill profiles."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.paths import PARAMS_DIR

HUB_MODEL_ID = "unsloth/Llama-3.2-3B-Instruct"


@dataclass(frozen=True)
class ThesisConfig:
    """Hyperparameters of ``train_peft_v3.py`` exactly as the thesis documents them."""

    model_name: str = HUB_MODEL_ID
    max_seq_length: int = 512
    # QLoRA quantisation
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "fp16"  # torch.float16 in the script
    # LoRA
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    # Optimisation
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 2
    learning_rate: float = 1e-4
    max_steps: int = 2000
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 0.5
    lr_scheduler_type: str = "cosine"
    optim: str = "paged_adamw_8bit"
    fp16: bool = True
    group_by_length: bool = True
    eval_steps: int = 200
    pad_token_is_eos: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (lists instead of tuples) for JSON files."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


THESIS = ThesisConfig()


class ProfileError(ValueError):
    """A profile name or a profile file that cannot be used."""


def list_profiles() -> list[str]:
    """Names of the profiles in ``notebooks/params/`` (one YAML each)."""
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def profile_file(name: str) -> Path:
    """Path of a profile's YAML, or a ``ProfileError`` listing the known profiles."""
    path = PARAMS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_profiles()) or "(none)"
        raise ProfileError(
            f"unknown profile {name!r}: no file {path}. Known profiles: {known}. "
            f"Pass one of them with --profile, or add {path.name} to {PARAMS_DIR}."
        )
    return path


def load_profile(name: str) -> dict[str, Any]:
    """Read a profile YAML: ``description``, ``common`` and per-notebook params."""
    path = profile_file(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc}). Fix the file's syntax.") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level.")
    data.setdefault("common", {})
    data.setdefault("notebooks", {})
    unknown = set(data) - {"description", "common", "notebooks"}
    if unknown:
        raise ProfileError(
            f"{path}: unknown top-level keys {sorted(unknown)}; allowed are description, common, notebooks."
        )
    return data


def notebook_parameters(profile: dict[str, Any], notebook_number: str) -> dict[str, Any]:
    """Parameters for one notebook: the profile's ``common`` block overlaid by its own block."""
    params = dict(profile.get("common") or {})
    params.update((profile.get("notebooks") or {}).get(notebook_number) or {})
    return params
