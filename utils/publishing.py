"""Publishing a run: its figures to the committed ``figures/<run>/`` and, for a profile with ``publish_results:
true``, its small data files to ``results/<run>/`` with a ``PROVENANCE.json`` (``python -m utils.runner --publish``).

Only notebooks that finished (wrote their ``NN_run.json``) are published: a notebook stopped half-way leaves
files no finished run stands behind. An earlier publication of the same run keeps the notebooks this one did not
run, in its provenance and its figure index.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from utils.config import ProfileError, check_run_name, load_profile, runner_command
from utils.files import read_json, save_json
from utils.paths import published_figures_dir, published_results_dir, run_dir
from utils.plotting import write_figure_index


def copy_files(files: list[Path], target: Path) -> Path:
    """Copy ``files`` into ``target`` (created), each through a temporary file and a rename."""
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        tmp = target / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target / path.name)
    return target


def finished_notebooks(run: Path) -> set[str]:
    """The numbers ("04", "05") of the notebooks that finished in ``run``: those that wrote their ``NN_run.json``."""
    return {p.name[:2] for p in run.glob("[0-9][0-9]_run.json")}


def from_finished_notebooks(files: list[Path], finished: set[str]) -> list[Path]:
    """``files`` less those of a notebook not in ``finished`` (``NN_…`` without ``NN_run.json``): a notebook stopped
    half-way (a failed cell, the machine taken back) leaves files that no finished run stands behind."""
    return [p for p in files if not (re.match(r"\d\d_", p.name) and p.name[:2] not in finished)]


def publish_figures(profile_name: str) -> Path:
    """Copy ``runs/<profile>/figures/*`` of its finished notebooks to the committed ``figures/<profile>/`` (each
    file written atomically)."""
    run = run_dir(profile_name)
    source = run / "figures"
    finished = finished_notebooks(run)
    files = from_finished_notebooks(sorted(p for p in source.glob("*") if p.is_file()), finished)
    if not files:
        raise ProfileError(f"{source} holds no figures: run the profile first "
                           f"(python -m utils.runner --profile {profile_name}).")
    target = copy_files([p for p in files if p.name not in FIGURE_INDEX], published_figures_dir(profile_name))
    merge_figure_index(source / FIGURE_INDEX[0], target, finished)
    return target


def merge_figure_index(index: Path, target: Path, finished: set[str]) -> None:
    """Add the run's ``figuras.json`` entries of finished notebooks to ``target``'s (an earlier publication's
    figures stay listed) and write ``figuras.tex`` from the union."""
    if not index.is_file():
        return
    merged = read_json(target / FIGURE_INDEX[0]) if (target / FIGURE_INDEX[0]).is_file() else {}
    merged.update({name: entry for name, entry in read_json(index).items() if name[:2] in finished})
    write_figure_index(target, merged)


# A published run's data: the small files at the top of runs/<run>/ (records, metrics, histories, tables), never
# the adapter, the checkpoints, the merged model or the GGUF files (folders), nor the live progress files.
PUBLISHED_PATTERNS = ("*.json", "*.csv")
UNPUBLISHED = re.compile(r"\d\d_progress\.json")
PROVENANCE_FILE = "PROVENANCE.json"
FIGURE_INDEX = ("figuras.json", "figuras.tex")  # a figure folder's index, and the LaTeX written from it


def published_data_files(run: Path) -> list[Path]:
    """The files of ``run`` that ``publish_results`` copies (``PUBLISHED_PATTERNS``, top level only)."""
    files = {p for pattern in PUBLISHED_PATTERNS for p in run.glob(pattern) if p.is_file()}
    return from_finished_notebooks(sorted(p for p in files if not UNPUBLISHED.fullmatch(p.name)),
                                   finished_notebooks(run))


def recorded_overrides(records: dict[str, dict[str, Any]]) -> list[str]:
    """The ``--set`` items of the notebooks' own commands (``NN_run.json``), for a run without ``runner.json``."""
    items: list[str] = []
    for record in records.values():
        words = shlex.split(record.get("command") or "")
        items += [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--set" and words[i + 1] not in items]
    return items


def run_provenance(run: Path, profile_name: str, run_name: str) -> dict[str, Any]:
    """What ``run``'s folder says of itself for ``PROVENANCE.json``: what ran (profile, run, command) and, per
    notebook, where and how long (from each ``NN_run.json``: date, device, commit, versions, wall time). The
    publication's totals (commit, wall time, files) are ``merge_provenance``'s, over every notebook published."""
    records = {p.name[:2]: read_json(p) for p in sorted(run.glob("[0-9][0-9]_run.json"))}
    if not records:
        raise ProfileError(f"{run} holds no NN_run.json: no notebook finished there, nothing to publish. Run it "
                           f"first (python -m utils.runner --profile {profile_name} --run-name {run_name}).")
    summary = read_json(run / "runner.json") if (run / "runner.json").is_file() else {}
    overrides = summary["overrides"] if "overrides" in summary else recorded_overrides(records)
    first = records[min(records)]
    notebooks = {number: {"wall_time_s": r.get("wall_time_s"), "started_at": r.get("started_at"),
                          "command": r.get("command"), "commit": r.get("commit"), "device": r.get("device")}
                 for number, r in records.items()}
    return {
        "run": run_name, "profile": profile_name,
        "date": first.get("started_at"), "device": first.get("device"),
        "compute_capability": first.get("compute_capability"), "gpu_memory_gib": first.get("gpu_memory_gib"),
        "command": summary.get("command") or runner_command(profile_name, None, run_name, overrides),
        "overrides": overrides,
        "versions": first.get("versions"),
        "notebooks": notebooks,
    }


def commit_label(notebooks: dict[str, dict[str, Any]]) -> str | None:
    """The commit of a publication: its one commit, or each with its notebooks when they ran at different commits
    (``"f8ecac9 (04), 2c4ce5a (05)"``: notebook 05 run in a later session on notebook 04's adapter)."""
    by_commit: dict[str, list[str]] = {}
    for number, record in sorted(notebooks.items()):
        if record.get("commit"):
            by_commit.setdefault(str(record["commit"]), []).append(number)
    if len(by_commit) <= 1:
        return next(iter(by_commit), None)
    return ", ".join(f"{sha[:7]} ({', '.join(numbers)})" for sha, numbers in by_commit.items())


def publish_results(profile_name: str, run_name: str | None = None) -> Path:
    """Copy a run's small data files to the committed ``results/<run>/`` and write its ``PROVENANCE.json``."""
    run_name = check_run_name(run_name or profile_name)
    source = run_dir(run_name)
    provenance = run_provenance(source, profile_name, run_name)
    target = copy_files(published_data_files(source), published_results_dir(run_name))
    save_json(merge_provenance(read_json(target / PROVENANCE_FILE) if (target / PROVENANCE_FILE).is_file() else {},
                               provenance, sorted(p.name for p in published_data_files(target))),
              target / PROVENANCE_FILE)
    return target


def merge_provenance(earlier: dict[str, Any], new: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """A publication on top of an earlier one (``--only 04 05`` on another machine): the notebooks this run did
    not execute keep their earlier record (commit, date, device, wall time); the publication's ``commit``
    (``commit_label``) and total wall time cover them all, and ``files`` lists every data file now in the folder."""
    kept = {n: r for n, r in (earlier.get("notebooks") or {}).items() if n not in new["notebooks"]}
    notebooks = dict(sorted({**kept, **new["notebooks"]}.items()))
    merged = {**new, "notebooks": notebooks, "commit": commit_label(notebooks),
              "files": [f for f in files if f != PROVENANCE_FILE],
              "wall_time_s": round(sum(n.get("wall_time_s") or 0 for n in notebooks.values()), 1)}
    if kept:
        merged["kept_from_earlier_publication"] = sorted(kept)
    return merged


def publish_run(profile_name: str, run_name: str | None = None) -> list[Path]:
    """``--publish``: the figures to ``figures/<run>/`` and, when the profile says ``publish_results: true``, the
    data to ``results/<run>/``; returns the folders written."""
    run_name = run_name or profile_name
    folders = [publish_figures(run_name)]
    if load_profile(profile_name).get("publish_results"):
        folders.append(publish_results(profile_name, run_name))
    return folders
