"""The original script's hyperparameters (the thesis defaults) and the papermill profiles."""

from __future__ import annotations

import math
import re
import shlex
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


# A profile's top level: ``publish_results: true`` makes ``--publish`` copy the run's small data files to
# ``results/<run>/`` besides its figures (the GPU profiles); without it only the figures are published.
TOP_LEVEL_KEYS = ("description", "publish_results", "common", "notebooks")


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
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ProfileError(
            f"{path}: unknown top-level keys {sorted(unknown)}; allowed are {', '.join(TOP_LEVEL_KEYS)}."
        )
    if not isinstance(data.get("publish_results", False), bool):
        raise ProfileError(f"{path}: publish_results must be true or false, not {data['publish_results']!r}.")
    data["common"] = _mapping(data.get("common"), path, "common")
    data["notebooks"] = _mapping(data.get("notebooks"), path, "notebooks")
    for number, block in data["notebooks"].items():
        data["notebooks"][number] = _mapping(block, path, f"notebooks.{number}")
    return data


def _mapping(block: Any, path: Path, name: str) -> dict[str, Any]:
    """A profile block as a dict (an empty block is ``{}``), or one error naming the block and its type."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ProfileError(f"{path}: {name} must be a mapping of `name: value` lines, not a "
                           f"{type(block).__name__}. Write each parameter as `key: value` under it.")
    return block


def notebook_parameters(profile: dict[str, Any], notebook_number: str) -> dict[str, Any]:
    """Parameters for one notebook: the profile's ``common`` block overlaid by its own block."""
    params = dict(profile.get("common") or {})
    params.update((profile.get("notebooks") or {}).get(notebook_number) or {})
    return params


def coerce_value(value: Any, default: Any) -> Any:
    """``value`` as the type of a parameter's ``default``; a ``ValueError`` names the expected type.

    YAML 1.1 (PyYAML) reads ``1e-4`` as a string: a numeric string for a number parameter becomes the
    number. A bool is never a number, a float with a fraction is never an integer; a string parameter
    keeps a string or a bool (``resume: true``) and takes a number as its text.
    """
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if isinstance(default, (int, float)):
        return _coerce_number(value, integer=isinstance(default, int))
    if isinstance(default, str):
        if isinstance(value, (str, bool)):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise ValueError("expected a string")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ValueError("expected a list, e.g. [a, b]")
    return value


def _coerce_number(value: Any, integer: bool) -> int | float:
    """An int or float from a number or a numeric string (``"1e-4"``); a ``ValueError`` otherwise."""
    expected = "expected an integer" if integer else "expected a number, e.g. 1e-4"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(expected)
    try:
        number = float(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(expected) from None
    if not math.isfinite(number):
        raise ValueError(f"{expected} (finite)")
    if integer:
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(expected)
        return int(number)
    return float(number)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: str) -> str:
    """A run name usable as a folder name on every system (``gpu-off-s42``), or one ``ProfileError``."""
    if not RUN_NAME.fullmatch(name) or name in {".", ".."}:
        raise ProfileError(f"--run-name {name!r}: use letters, digits, '.', '_' and '-' only, starting with a letter "
                           "or digit (it names the folder runs/<name>/), e.g. --run-name gpu-off-s42.")
    return name


def runner_command(profile_name: str, only: list[str] | None, run_name: str | None, overrides: list[str]) -> str:
    """The runner's command line as a shell would type it (recorded in each notebook's ``NN_run.json``)."""
    words = ["python", "-m", "utils.runner", "--profile", profile_name]
    if only:
        words += ["--only", *only]
    if run_name and run_name != profile_name:
        words += ["--run-name", run_name]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)
