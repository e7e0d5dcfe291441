"""Trainer callbacks: the log history as CSV after every log, the progress file after every step, steady-state
throughput, and the live plot."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from transformers import TrainerCallback

from utils.files import atomic_write_text
from utils.plotting.training import LIVE_SIZE_IN, draw_training, live_title


def history_frame(log_history: list[dict]) -> pd.DataFrame:
    """The trainer's log history as a table, one row per log event."""
    return pd.DataFrame(log_history)


def write_history(log_history: list[dict], path: str | Path) -> Path:
    """Write the log history as CSV, atomically (a crash mid-write keeps the previous file)."""
    return atomic_write_text(path, history_frame(log_history).to_csv(index=False))


class HistoryCsvCallback(TrainerCallback):
    """Rewrite ``04_log_history.csv`` after every log, so a crash keeps every logged point."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_history(state.log_history, self.path)


def write_progress(path: str | Path, step: int, max_steps: int) -> Path:
    """Write ``{"step": step, "max_steps": max_steps}`` atomically (a reader never sees half a file)."""
    return atomic_write_text(path, json.dumps({"step": int(step), "max_steps": int(max_steps)}) + "\n")


class ProgressFileCallback(TrainerCallback):
    """Rewrite ``04_progress.json`` after every optimiser step: the runner's progress bar reads it.

    At the start it holds the step training starts from (0, or the checkpoint's step when resuming); an early
    stop leaves the step it stopped at.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_progress(self.path, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_progress(self.path, state.global_step, state.max_steps)


class ThroughputCallback(TrainerCallback):
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
        from IPython import get_ipython  # optional: absent outside Jupyter installs

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except ImportError:
        return False


class LivePlotCallback(TrainerCallback):
    """Redraw loss (training and validation) and learning rate in place in the notebook as they are logged.

    One display handle is created at the start and updated after each log (at most every
    ``min_interval_s`` seconds, and always at the end), so the last state stays in the saved notebook. Its title
    is the progress: step, elapsed and estimated remaining time (the trainer's own text bar is off in a notebook).
    Outside a Jupyter kernel it does nothing (the command line has the progress bar and the CSV).
    """

    def __init__(self, max_steps: int | None = None, min_interval_s: float = 1.0):
        self.max_steps = max_steps
        self.min_interval_s = min_interval_s
        self.handle = None
        self._last = 0.0
        self._start: tuple[float, int] | None = None
        self.enabled = in_notebook()

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), state.global_step)

    def _render(self, state) -> Any:
        from IPython.display import Image  # optional: only reached inside a Jupyter kernel

        fig = Figure(figsize=LIVE_SIZE_IN, layout="constrained")
        draw_training(fig, history_frame(state.log_history), self.max_steps)
        start, first_step = self._start or (time.perf_counter(), state.global_step)
        fig.suptitle(live_title(state.global_step, self.max_steps or state.max_steps,
                                time.perf_counter() - start, state.global_step - first_step))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
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
            from IPython.display import display  # optional: only reached inside a Jupyter kernel

            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, force=True)
