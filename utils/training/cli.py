"""The command line of notebook 04 (``python -m utils.training``): a profile's settings, flags, the run.

    python -m utils.training --profile demo                      # the profile's common and "04" parameters
    python -m utils.training --profile smoke --max-steps 6 --save-steps 2 --output-dir /tmp/run
    python -m utils.training --profile smoke --output-dir /tmp/run           # after a crash: continues (resume auto)
    python -m utils.training --profile smoke --output-dir /tmp/run --no-resume  # stops if checkpoints are left
    python -m utils.training --model embedded --max-steps 5 --compute-dtype fp16 --quantization nf4_dq
    python -m utils.training --profile smoke --early-stopping-patience 3    # stop when validation stops improving
    python -m utils.training --model embedded --fast-path on --fast-path-kernels torch   # PyTorch ops, no Triton
    QLORA_EMULATE_CAPABILITY=7.5 python -m utils.training --model embedded   # decide as an RTX 20xx would
    accelerate launch --num_processes 2 -m utils.training --profile thesis   # DDP, one process per GPU
    python -m utils.training summarize-campaign runs/campaign --out results/04_gpu_campaign.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from utils.config import ProfileError, load_profile, notebook_parameters
from utils.data import DatasetError
from utils.device import CapabilityEmulationError
from utils.modeling import ModelNotAvailableError
from utils.runner import check_profile_keys, resolve_parameters, select_notebooks
from utils.training.campaign import main as campaign_main
from utils.training.run import train
from utils.training.settings import (
    NOTEBOOK, NOTEBOOK_ONLY, RENAMED_SETTINGS, TrainingConfigError, TrainingOutOfMemoryError, TrainingOutputError,
    TrainingSettings, check_renamed, setting_names,
)

SUMMARIZE = "summarize-campaign"


def profile_settings(profile: str, **overrides: Any) -> TrainingSettings:
    """Settings of a profile: the thesis defaults, the profile's ``common`` and "04" keys, then ``overrides``.

    The profile is read as the runner reads it: every block is checked first (a misspelt key in ``common`` or
    "04" is one ``ProfileError`` naming the key, the file and the known names), and notebook 04 receives the
    ``common`` keys its parameters cell declares (``max_seq_length`` among them) overlaid by its own block.
    """
    data = load_profile(profile)
    for number, block in data["notebooks"].items():  # before the runner's generic "unknown key" message
        if str(number).zfill(2) == NOTEBOOK:
            check_renamed(block)
    data = check_profile_keys(profile, data)  # checked, and "1e-4" read as text → 1e-4
    params = resolve_parameters(select_notebooks([NOTEBOOK])[0], notebook_parameters(data, NOTEBOOK))
    params.update({k: v for k, v in overrides.items() if v is not None})
    params["profile"] = profile
    for key in NOTEBOOK_ONLY:
        params.pop(key, None)
    unknown = set(params) - setting_names()
    if unknown:
        raise TrainingConfigError(f"unknown training settings {sorted(unknown)}; known: {sorted(setting_names())}")
    return TrainingSettings(**params)


def build_parser() -> argparse.ArgumentParser:
    """One ``--flag`` per setting (``--max-seq-length``), plus ``--model`` for ``--model-name``."""
    parser = argparse.ArgumentParser(prog="python -m utils.training", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="thesis", help="profile YAML in notebooks/params (default: thesis)")
    for f in dataclasses.fields(TrainingSettings):
        if f.name == "profile":
            continue
        if f.name == "resume":
            parser.add_argument("--resume", nargs="?", const=True, default=None, type=_resume_flag,
                                help="auto (default): continue an unfinished run of the same settings; "
                                     "--resume: continue (also a finished run); --no-resume: never continue")
            parser.add_argument("--no-resume", dest="resume", action="store_false")
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + (["--model"] if f.name == "model_name" else [])
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None)
    parser.add_argument("--keep-trl-bf16-adapters", action="store_true",
                        help="skip the fp16 recast of the trainable parameters (shows the error it prevents)")
    for old in RENAMED_SETTINGS:  # accepted only to say where the setting went
        parser.add_argument(f"--{old.replace('_', '-')}", dest=f"renamed_{old}", help=argparse.SUPPRESS)
    parser.epilog = f"{SUMMARIZE} DIR --out FILE: collect a GPU campaign's runs into one JSON (see --help there)."
    return parser


def _resume_flag(text: str) -> bool | str:
    """``--resume auto|true|false`` (``--resume`` alone is True)."""
    value = {"auto": "auto", "true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, true or false")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m utils.training``; user errors print one message and exit with 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [SUMMARIZE]:
        return campaign_main(argv[1:])
    args = vars(build_parser().parse_args(argv))
    profile = args.pop("profile")
    keep_bf16 = args.pop("keep_trl_bf16_adapters")
    renamed = [old for old in RENAMED_SETTINGS if args.pop(f"renamed_{old}") is not None]
    try:
        check_renamed(renamed)
        settings = profile_settings(profile, **args)
        train(settings, keep_trl_bf16_adapters=keep_bf16)
    except (TrainingConfigError, TrainingOutOfMemoryError, TrainingOutputError, DatasetError,
            ModelNotAvailableError, ProfileError, CapabilityEmulationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
