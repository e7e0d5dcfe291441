"""Unsloth, the peer the benchmark measures against, must be imported before transformers, peft and trl.

Unsloth patches those libraries as it is imported, and warns that its optimisations may be missing when they
were imported first. Every module of the benchmark that measures imports them at its top, so
``python -m utils.speed.benchmark`` calls ``import_unsloth_first`` before it imports them; this module (and the
packages above it) import none of them.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence


def measures_unsloth(argv: Sequence[str]) -> bool:
    """Whether a command line is a ``child`` process that measures an Unsloth configuration."""
    if len(argv) < 2 or argv[0] != "child":
        return False
    try:
        return json.loads(argv[1])["config"]["impl"] == "unsloth"
    except (ValueError, KeyError, TypeError):
        return False  # not a task: the command line reports it


def import_unsloth_first(argv: Sequence[str]) -> None:
    """Import Unsloth when this process measures it (a missing Unsloth becomes the row's error in ``child``)."""
    if not measures_unsloth(argv):
        return
    if any(name in sys.modules for name in ("transformers", "peft", "trl")):
        raise RuntimeError("utils.speed.benchmark: transformers, peft or trl was imported before Unsloth; "
                           "keep them out of the imports of utils, utils.speed and utils.speed.benchmark.")
    try:
        import unsloth  # noqa: F401  (optional: the peer rows only)
    except ImportError:
        pass
