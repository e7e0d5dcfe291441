"""results/: the index in results/README.md matches the folder, and the result files carry their provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from utils.paths import NOTEBOOKS_DIR, RESULTS_DIR

INDEX = RESULTS_DIR / "README.md"
NOTES = RESULTS_DIR / "04_speed_notes.md"
HISTORY = "history/"
# A result file's name as the notes write it: "04_x.json", "history/04_x.log", "04_x.{json,log}".
RESULT_NAME = re.compile(r"(?:history/)?\d\d_[\w.-]+\.(?:json|log|md|\{json,log\})")


def expand(name: str) -> list[str]:
    """``"a.{json,log}"`` -> ``["a.json", "a.log"]``; other names as they are."""
    match = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", name)
    if match is None:
        return [name]
    return [f"{match[1]}{alt}{match[3]}" for alt in match[2].split(",")]


def index_rows() -> dict[str, dict[str, str]]:
    """Each file of the index's tables (path relative to ``results/``) -> its row, by column header."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in INDEX.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = cells
        elif cells[0].startswith("`"):
            row = dict(zip(header, cells))
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows.update({path: row for path in expand(name)})
    return rows


def files_on_disk() -> set[str]:
    """Every file under ``results/`` but the index itself; a published run folder (``<run>/`` with a
    ``PROVENANCE.json``, from ``python -m utils.runner --publish``) counts as one entry ``<run>/``."""
    runs = {p.parent for p in RESULTS_DIR.glob("*/PROVENANCE.json")}
    files = {p.relative_to(RESULTS_DIR).as_posix() for p in RESULTS_DIR.rglob("*")
             if p.is_file() and p != INDEX and not runs & set(p.parents)}
    return files | {f"{run.name}/" for run in runs}


def notebook_text() -> str:
    """The source of every notebook (code and markdown cells)."""
    cells = []
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        cells += ["".join(cell["source"]) for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    return "\n".join(cells)


def current_json_read_by_notebooks() -> set[str]:
    """Current JSON files a notebook reads: named in a notebook, or indexed as read by one."""
    text = notebook_text()
    return {path for path, row in index_rows().items()
            if path.endswith(".json") and not path.startswith(HISTORY)
            and (Path(path).name in text or "notebook" in row["read by"])}


def dicts_in(data: Any) -> Iterator[dict]:
    """Every dict in a JSON document, nested ones included."""
    if isinstance(data, dict):
        yield data
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            yield from dicts_in(item)


def test_every_result_file_is_indexed():
    missing = files_on_disk() - set(index_rows())
    assert not missing, f"files in results/ without a row in results/README.md: {sorted(missing)}"


def test_every_indexed_file_exists():
    absent = set(index_rows()) - files_on_disk()
    assert not absent, f"results/README.md indexes files that are not in results/: {sorted(absent)}"


def test_superseded_files_live_in_history():
    for path, row in index_rows().items():
        current = row["status"] == "current"
        assert current or row["status"].startswith("superseded"), (path, row["status"])
        assert current != path.startswith(HISTORY), (
            f"{path} is {row['status']!r}: current files stay in results/, superseded ones go to results/history/")


def test_json_read_by_a_notebook_records_date_and_device():
    read = current_json_read_by_notebooks()
    assert {"02_twin_gpu_memory.json", "04_speed_benchmark.json"} <= read
    for path in sorted(read):
        data = json.loads((RESULTS_DIR / path).read_text(encoding="utf-8"))
        assert {"date", "device"} <= set(data), f"results/{path} lacks its date or device"


def test_json_with_a_commit_records_its_command():
    for path in sorted(p for p in files_on_disk() if p.endswith(".json")):
        for record in dicts_in(json.loads((RESULTS_DIR / path).read_text(encoding="utf-8"))):
            if "commit" in record:
                assert "command" in record, f"results/{path}: a record with a commit and no command"


def test_speed_notes_name_only_existing_files():
    named = {path for name in RESULT_NAME.findall(NOTES.read_text(encoding="utf-8")) for path in expand(name)}
    assert named, "no result file named in results/04_speed_notes.md"
    absent = named - files_on_disk()
    assert not absent, f"results/04_speed_notes.md names files that are not in results/: {sorted(absent)}"
