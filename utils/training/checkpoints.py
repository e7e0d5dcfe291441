"""The checkpoints of a run folder: the last complete one, and what the trainer had seen when it wrote it."""

from __future__ import annotations

import json
from pathlib import Path

from utils.files import read_json


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


def tokens_seen_at(checkpoint: str | Path | None) -> int:
    """Input tokens the trainer had seen when it wrote ``checkpoint`` (0 without one)."""
    if not checkpoint:
        return 0
    return read_json(Path(checkpoint) / "trainer_state.json").get("num_input_tokens_seen", 0)
