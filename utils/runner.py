"""Run the numbered notebooks in order with papermill on one profile.

    python -m utils.runner --profile demo                 # all notebooks
    python -m utils.runner --profile smoke --only 03      # one notebook (or several: --only 01,04)
    python -m utils.runner --profile demo --publish       # then copy its figures to figures/demo/
    python -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s42 --set 04.fast_path=off --publish

Executed copies go to ``runs/<profile>/``, figures and tables to ``runs/<profile>/figures/`` (all git-ignored,
so a run never changes a committed file). ``--publish`` copies a complete run's figures to the committed
``figures/<profile>/``; a profile with ``publish_results: true`` (the GPU ones) also copies the run's small data
files (``*.json``, ``*.csv``; no adapter, checkpoint or exported model) to ``results/<run>/`` with a
``PROVENANCE.json``. ``--run-name`` runs a profile into another folder (``runs/<name>/``; the notebooks get
``profile=<name>``), ``--set [NN.]key=value`` changes one parameter (typed like the notebook's default). The run
stops at the first failing notebook and names it and the failing cell.

The console shows one line per notebook with a progress bar: its code cells, or, while a notebook rewrites
``runs/<profile>/NN_progress.json`` (``{"step": n, "max_steps": m}``; notebook 04's training does), its steps.
Each ``make`` target has a ``python -m`` equivalent for machines without ``make`` (README, "Windows / conda").
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import papermill as pm
import yaml
import zmq
from jupyter_client import AsyncKernelManager
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError
from tqdm import tqdm
from traitlets import Unicode, default
from traitlets.config import Config

from utils.config import (
    ProfileError, check_run_name, coerce_value, list_profiles, load_profile, notebook_parameters, profile_file,
    runner_command,
)
from utils.files import read_json, save_json
from utils.paths import NOTEBOOKS_DIR, run_dir, scoped_environ
from utils.publishing import publish_run


class NotebookFailed(RuntimeError):
    """A notebook raised during execution; the message names it and its failing cell."""


class RunnerKernelManager(AsyncKernelManager):
    """The runner's kernels: encrypted sockets, and the kernel process's own output in a log file.

    ipykernel >= 7.4 warns "Kernel is running over TCP without encryption" on every start unless the kernel
    manager provisions CurveZMQ keys (ipykernel PR #1515, jupyter_client PR #1110). jupyter_client >= 8.10 does
    so only when ``transport_encryption`` is "auto"/"required"; its default, the one nbclient and papermill use,
    is "disabled". "auto" encrypts kernels whose kernelspec declares ``supported_encryption: curve`` (ipykernel's
    does); a pyzmq built without CURVE keeps the plain transport rather than failing.

    What the kernel process itself prints (its log, e.g. "KeyboardInterrupt caught in kernel" when jupyter_client
    interrupts it on shutdown, or a crash report) goes to ``log_file`` instead of the runner's console; the
    notebook's own output is in the executed notebook as always.
    """

    log_file = Unicode("", config=True, help="file for the kernel process's stdout and stderr ('': inherit)")

    @default("transport_encryption")
    def _default_transport_encryption(self) -> str:
        """Encrypt where pyzmq can."""
        return "auto" if zmq.has("curve") else "disabled"

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        """Launch with stdout/stderr into ``log_file`` (jupyter_client's override point for launching)."""
        if not self.log_file:
            return await super()._async_launch_kernel(kernel_cmd, **kw)
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": log, "stderr": log})


class NotebookProgress:
    """One console line for one notebook: a bar over its code cells, or over the steps its progress file reports.

    ``on_notebook_start`` and ``on_cell_executed`` are nbclient hooks; a thread polls ``progress_file`` (JSON
    ``{"step": n, "max_steps": m}``, rewritten by the notebook) and switches the bar to steps once the file is
    newer than the notebook's start.
    """

    POLL_SECONDS = 0.5
    BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} [{elapsed}]"

    def __init__(self, desc: str, progress_file: Path | None, stream: TextIO | None = None):
        self.progress_file, self.started = progress_file, time.time()
        self.lock, self.stopped, self.mode = threading.Lock(), threading.Event(), "cells"
        self.bar = tqdm(total=None, desc=desc, unit="cell", file=stream or sys.stdout, leave=True,
                        dynamic_ncols=True, mininterval=0.5,
                        bar_format=self.BAR_FORMAT)
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()

    def on_notebook_start(self, notebook: Any, **_: Any) -> None:
        """nbclient hook: the bar's total is the number of code cells that will run."""
        with self.lock:
            if self.mode == "cells":
                self.bar.reset(total=sum(c.cell_type == "code" and bool(c.source.strip()) for c in notebook.cells))

    def on_cell_executed(self, **_: Any) -> None:
        """nbclient hook: one more code cell done."""
        with self.lock:
            if self.mode == "cells":
                self.bar.update(1)

    def read_steps(self) -> tuple[int, int] | None:
        """``(step, max_steps)`` from the progress file when this run wrote it, else None."""
        try:
            # older than this notebook's start (1 s of slack for coarse file times): an earlier run's
            if self.progress_file is None or self.progress_file.stat().st_mtime < self.started - 1:
                return None
            data = read_json(self.progress_file)
            return int(data["step"]), int(data["max_steps"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, stale or half-written: try again later
            return None

    def _poll(self) -> None:
        """Follow the progress file until ``close``."""
        while not self.stopped.wait(self.POLL_SECONDS):
            steps = self.read_steps()
            if steps is None:
                continue
            with self.lock:
                if self.mode != "steps" or self.bar.total != steps[1]:
                    self.mode, self.bar.unit = "steps", "step"
                    self.bar.reset(total=steps[1])
                self.bar.n = steps[0]
                self.bar.refresh()

    def close(self, status: str) -> None:
        """Stop polling and leave the line with ``status`` at its end."""
        self.stopped.set()
        self.poller.join()
        with self.lock:
            self.bar.bar_format = f"{self.BAR_FORMAT} {status}"
            self.bar.close()


def list_notebooks() -> list[Path]:
    """The numbered notebooks ``notebooks/NN_*.ipynb`` in run order."""
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(only: list[str] | None) -> list[Path]:
    """Notebooks whose two-digit number (or full stem) is in ``only``; all when ``only`` is empty."""
    notebooks = list_notebooks()
    if not only:
        return notebooks
    only = [part.strip() for item in only for part in item.split(",") if part.strip()]  # "--only 01,03"
    if not only:
        raise ProfileError("--only names no notebook; give numbers such as --only 01,04 (or leave it out for all)")
    wanted = {o.zfill(2) if o.isdigit() else o for o in only}
    chosen = [nb for nb in notebooks if nb.name[:2] in wanted or nb.stem in wanted]
    missing = wanted - {nb.name[:2] for nb in chosen} - {nb.stem for nb in chosen}
    if missing:
        known = ", ".join(nb.stem for nb in notebooks)
        raise ProfileError(f"no notebook matches {sorted(missing)}; the notebooks are: {known}")
    return chosen


def resolve_parameters(notebook: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Keep the profile's parameters that the notebook declares; a notebook-specific unknown is an error."""
    declared = declared_parameters(notebook)
    return {k: v for k, v in params.items() if k in declared}


def declared_parameters(notebook: Path) -> set[str]:
    """The names a notebook's ``parameters`` cell declares."""
    return set(declared_defaults(notebook))


def declared_defaults(notebook: Path) -> dict[str, Any]:
    """Each parameter's default as the ``parameters`` cell writes it (None where it is not a plain literal)."""
    return dict(_inspect_defaults(str(notebook), Path(notebook).stat().st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _inspect_defaults(notebook: str, mtime_ns: int) -> dict[str, Any]:
    """``declared_defaults`` once per notebook version (papermill's inspection starts a parser each time)."""
    defaults = {}
    for name, info in pm.inspect_notebook(notebook).items():
        try:
            defaults[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            defaults[name] = None
    return defaults


def check_profile_keys(profile_name: str, profile: dict[str, Any]) -> dict[str, Any]:
    """Fail on any parameter a profile sets that no notebook it reaches declares (a typo), ``common`` included.

    Returns the profile with every value converted to the type of the declared default (``coerce_profile``).
    """
    notebooks = list_notebooks()
    declared = {nb.name[:2]: declared_defaults(nb) for nb in notebooks}
    blocks = {"common": (profile.get("common") or {}, [d for d in declared.values()])}
    for number, own in (profile.get("notebooks") or {}).items():
        if str(number) not in declared:
            raise ProfileError(f"{profile_file(profile_name)}: notebooks.{number}: no notebook has that number; "
                               f"the notebooks are {', '.join(sorted(declared))}.")
        blocks[f"notebooks.{number}"] = (own or {}, [declared[str(number)]])
    for block, (values, defaults) in blocks.items():
        known = set().union(*defaults)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProfileError(
                f"{profile_file(profile_name)}: {block} sets {unknown}, which no notebook there declares in its "
                f"'parameters' cell. Fix the name; the known names are: {', '.join(sorted(known))}."
            )
    return coerce_profile(profile_name, profile, blocks)


def coerce_profile(profile_name: str, profile: dict[str, Any],
                   blocks: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> dict[str, Any]:
    """The profile with each value as the type of its notebook's default (``1e-4`` read as text → 1e-4).

    A value that does not convert is one ``ProfileError`` naming the file, block, key, value and type.
    """
    coerced = {**profile, "common": {}, "notebooks": {}}
    for block, (values, defaults) in blocks.items():
        converted = {}
        for key, value in values.items():
            errors = []
            for notebook_default in (d[key] for d in defaults if key in d):
                try:
                    converted[key] = coerce_value(value, notebook_default)
                    break
                except ValueError as exc:
                    errors.append(str(exc))
            else:
                raise ProfileError(
                    f"{profile_file(profile_name)}: {block}: {key}: {value!r} cannot be used: {errors[0]} "
                    f"(the notebook's default is {next(d[key] for d in defaults if key in d)!r})."
                )
        if block == "common":
            coerced["common"] = converted
        else:
            coerced["notebooks"][block.split(".", 1)[1]] = converted
    return coerced


def parse_set(item: str) -> tuple[str | None, str, Any]:
    """``"04.fast_path=off"`` -> ``("04", "fast_path", "off")``; ``"seed=43"`` -> ``(None, "seed", 43)``.

    The value is read as a YAML scalar or list (``1e-3``, ``true``, ``[a, b]``), as a profile file would hold it.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    number, dot, name = key.partition(".")
    if not dot:
        number, name = None, key
    if not sep or not name or (number is not None and not (number.isdigit() and len(number) == 2)):
        raise ProfileError(f"--set {item!r}: write --set key=value (every notebook that declares key) or "
                           "--set NN.key=value (one notebook), e.g. --set 04.fast_path=off.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ProfileError(f"--set {item!r}: the value is not valid YAML ({exc}). Quote it, e.g. "
                           f"--set '{key}=\"{raw}\"'.") from None
    return number, name, value


def apply_overrides(profile: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """The profile with each ``--set`` applied (typed like the declared default); unknown keys are one error.

    ``key=value`` goes to ``common`` and to every notebook block that sets ``key`` itself (so it wins there too);
    ``NN.key=value`` to notebook NN's block only.
    """
    declared = {nb.name[:2]: declared_defaults(nb) for nb in list_notebooks()}
    profile = {**profile, "common": dict(profile.get("common") or {}),
               "notebooks": {k: dict(v or {}) for k, v in (profile.get("notebooks") or {}).items()}}
    for item in items:
        number, key, value = parse_set(item)
        if key == "profile":
            raise ProfileError(f"--set {item!r}: the run's name is set with --run-name NAME, not --set profile.")
        if number is not None and number not in declared:
            raise ProfileError(f"--set {item!r}: no notebook has the number {number}; the notebooks are "
                               f"{', '.join(sorted(declared))}.")
        defaults = [declared[number]] if number else list(declared.values())
        known = set().union(*defaults)
        if key not in known:
            where = f"notebook {number}" if number else "any notebook"
            raise ProfileError(f"--set {item!r}: {key!r} is not declared by {where} in its 'parameters' cell. Fix "
                               f"the name; the known names are: {', '.join(sorted(known))}.")
        default = next(d[key] for d in defaults if key in d)
        if isinstance(default, str) and isinstance(value, bool) and item.partition("=")[2].strip().lower() \
                not in ("true", "false"):
            value = item.partition("=")[2].strip()  # YAML 1.1 reads off/on/yes/no as booleans: keep the word
        try:
            value = coerce_value(value, default)
        except ValueError as exc:
            raise ProfileError(f"--set {item!r}: {value!r} cannot be used: {exc} (the notebook's default is "
                               f"{default!r}).") from None
        if number:
            profile["notebooks"].setdefault(number, {})[key] = value
        else:
            profile["common"][key] = value
            for block in profile["notebooks"].values():
                if key in block:
                    block[key] = value
    return profile


# Each kernel runs this before the first cell, so the libraries' known noise is filtered before anything imports
# them (bitsandbytes logs its warning while it is imported); the notebooks' setup cells make the same call for
# interactive sessions.
KERNEL_STARTUP = "from utils.quiet import quiet_known_noise; quiet_known_noise()"


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], log_output: bool,
                 progress: NotebookProgress | None = None) -> None:
    """Execute one notebook with papermill; raise ``NotebookFailed`` naming the failing cell.

    The kernel process's own output goes to ``NN_kernel.log`` next to ``output``.
    """
    hooks = {"on_notebook_start": progress.on_notebook_start,
             "on_cell_executed": progress.on_cell_executed} if progress else {}
    kernel_log = output.with_name(f"{notebook.name[:2]}_kernel.log")
    kernel_log.parent.mkdir(parents=True, exist_ok=True)
    kernel_log.write_bytes(b"")
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            cwd=str(NOTEBOOKS_DIR),
            progress_bar=False,
            log_output=log_output,
            kernel_name="python3",
            kernel_manager_class=RunnerKernelManager,
            config=Config({"RunnerKernelManager": {"log_file": str(kernel_log)}}),
            extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_STARTUP}"],
            **hooks,
        )
    except PapermillExecutionError as exc:
        raise NotebookFailed(
            f"{notebook.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\n  executed copy with the traceback: {output}"
        ) from None
    except DeadKernelError as exc:
        raise NotebookFailed(
            f"{notebook.name}: the kernel died ({exc}); out of memory is the usual cause. What the kernel printed "
            f"is in {kernel_log}; the cells run so far are in {output}."
        ) from None


def progress_path(out_dir: Path, notebook: Path) -> Path:
    """``<run folder>/NN_progress.json``: the steps a notebook reports while it runs (04: ``PROGRESS_FILE``)."""
    return out_dir / f"{notebook.name[:2]}_progress.json"


def run_with_progress(notebook: Path, out_dir: Path, params: dict[str, Any], desc: str, log_output: bool) -> float:
    """Run one notebook behind its console line (``desc``, a bar, then ``ok``/``FAILED``); return its seconds."""
    if log_output:  # the notebook's own output streams below; a bar would interleave with it
        print(desc, flush=True)
    progress = None if log_output else NotebookProgress(desc, progress_path(out_dir, notebook))
    start = time.perf_counter()
    try:
        run_notebook(notebook, out_dir / notebook.name, params, log_output, progress)
    except BaseException as exc:
        if progress:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            progress.close(f"{what} after {time.perf_counter() - start:.0f} s")
        raise
    seconds = round(time.perf_counter() - start, 1)
    if progress:
        progress.close(f"ok ({seconds:.0f} s)")
    else:
        print(f"{desc} ok ({seconds:.0f} s)", flush=True)
    return seconds


def plan_profile(profile_name: str, only: list[str] | None, run_name: str | None,
                 overrides: list[str]) -> tuple[dict[str, Any], list[Path], str]:
    """The checked profile (``--set`` applied), the notebooks to run and the run's name; nothing runs.

    Every mistake a run would meet before its first notebook (an unknown profile, notebook, key or value, a bad
    run name) is one ``ProfileError`` here.
    """
    profile = check_profile_keys(profile_name, load_profile(profile_name))
    notebooks = select_notebooks(only)
    run_name = check_run_name(run_name or profile_name)
    profile = apply_overrides(profile, overrides)
    profile["common"]["profile"] = run_name
    return profile, notebooks, run_name


def run_profile(profile_name: str, only: list[str] | None = None, log_output: bool = False,
                run_name: str | None = None, overrides: list[str] | None = None) -> Path:
    """Run the selected notebooks on a profile; return the run folder.

    ``run_name`` (default: the profile's name) names the folder ``runs/<run_name>/`` and is the ``profile``
    parameter every notebook gets, so notebook 05 finds the adapter notebook 04 trained under that name.
    ``overrides``: ``--set`` items (``"04.fast_path=off"``, ``"seed=43"``).
    """
    overrides = list(overrides or [])
    profile, notebooks, run_name = plan_profile(profile_name, only, run_name, overrides)
    out_dir = run_dir(run_name)
    timings: dict[str, float] = {}
    # written before the first notebook and after each: a run stopped half-way still says how it was started
    summary = {"profile": profile_name, "run": run_name, "overrides": overrides,
               "command": runner_command(profile_name, only, run_name, overrides), "seconds": timings}
    save_json(summary, out_dir / "runner.json")
    # What the kernels inherit, for the run only (a call from a notebook or a test leaves the process as it was).
    # Idle OpenMP threads sleep instead of spinning: on a small shared CPU spinning threads slowed forward passes
    # several-fold; a user's own setting wins.
    with scoped_environ(QLORA_PROFILE=run_name, QLORA_FIGURES_DIR=str(out_dir / "figures"),
                        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")):
        for i, nb in enumerate(notebooks, 1):
            params = resolve_parameters(nb, notebook_parameters(profile, nb.name[:2]))
            desc = f"[{i}/{len(notebooks)}] {nb.stem} ({run_name})"
            with scoped_environ(QLORA_COMMAND=runner_command(profile_name, [nb.name[:2]], run_name, overrides)):
                timings[nb.stem] = run_with_progress(nb, out_dir, params, desc, log_output)
            save_json(summary, out_dir / "runner.json")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help=f"one of: {', '.join(list_profiles())}")
    parser.add_argument("--only", nargs="+", action="extend", help="notebook numbers to run, e.g. --only 01 03")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    parser.add_argument("--run-name", default=None,
                        help="folder runs/<name>/ and the notebooks' profile parameter (default: the profile's name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[NN.]KEY=VALUE",
                        help="change one parameter: KEY=VALUE for every notebook, NN.KEY=VALUE for notebook NN "
                             "(repeatable), e.g. --set 04.fast_path=off --set seed=43")
    parser.add_argument("--publish", action="store_true",
                        help="after the run, copy its figures to the committed figures/<run>/ (and, for a profile "
                             "with publish_results: true, its data files to results/<run>/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the profile, notebooks and --set overrides, print what would run, run nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            _, notebooks, run_name = plan_profile(args.profile, args.only, args.run_name, args.overrides)
            print(f"would run {', '.join(nb.stem for nb in notebooks)} into {run_dir(run_name)}: "
                  f"{runner_command(args.profile, args.only, args.run_name, args.overrides)}")
            return 0
        if args.publish and args.only and not load_profile(args.profile).get("publish_results"):
            parser.error("--publish needs a complete run: leave out --only (a profile with publish_results: true "
                         "publishes the notebooks it ran)")
        out_dir = run_profile(args.profile, args.only, args.log_output, args.run_name, args.overrides)
        print(f"executed notebooks in {out_dir}")
        if args.publish:
            for folder in publish_run(args.profile, args.run_name):
                print(f"published to {folder}")
    except (ProfileError, NotebookFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
