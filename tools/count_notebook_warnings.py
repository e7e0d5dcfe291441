"""Count the noise in executed notebooks: stderr outputs, warning lines and raw progress bars per notebook.

    .venv/bin/python tools/count_notebook_warnings.py --profile smoke            # runs/smoke/*.ipynb
    .venv/bin/python tools/count_notebook_warnings.py --dir /tmp/old/runs/smoke  # any folder of executed copies
    .venv/bin/python tools/count_notebook_warnings.py --profile smoke --show     # and each distinct warning

Columns: stderr outputs (stream outputs named ``stderr``), warning lines (stderr lines that carry a warning:
``...Warning:``, ``WARNING``, a library's tagged log line such as ``[transformers] ...``, a logged "Failed to
..."; the indented source line Python prints under a warning belongs to it), progress-bar lines (tqdm's ``%|``)
and the other stderr lines. A closing TOTAL row sums the notebooks; ``--show`` lists each distinct warning line once with
its count (numbers and addresses masked so the same warning from two cells counts as one).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]

WARNING_LINE = re.compile(r"(\w*Warning\b|\bWARNING\b|^\s*Failed to |^\[[\w.-]+\] )")
PROGRESS_LINE = re.compile(r"\d+%\|")
VARIABLE_PART = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?")


def stderr_texts(notebook: Path) -> list[str]:
    """The text of every stderr stream output of an executed notebook, in cell order."""
    nb = nbformat.read(notebook, as_version=4)
    return [out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "stream" and out.get("name") == "stderr"]


def split_lines(text: str) -> list[str]:
    """Lines of a stream, a carriage return (a progress bar redrawing itself) ending a line too.

    The indented source line that Python's warning display prints under a warning is dropped (part of it).
    """
    lines: list[str] = []
    for line in re.split(r"[\r\n]+", text):
        if not line.strip() or (line[:1].isspace() and lines and WARNING_LINE.search(lines[-1])):
            continue
        lines.append(line)
    return lines


def count_notebook(notebook: Path) -> dict[str, object]:
    """Counts for one executed notebook, and its warning lines."""
    texts = stderr_texts(notebook)
    lines = [line for text in texts for line in split_lines(text)]
    warnings = [line.strip() for line in lines if WARNING_LINE.search(line)]
    bars = [line for line in lines if PROGRESS_LINE.search(line) and not WARNING_LINE.search(line)]
    return {"notebook": notebook.name, "stderr_outputs": len(texts), "warning_lines": len(warnings),
            "progress_lines": len(bars), "other_lines": len(lines) - len(warnings) - len(bars),
            "warnings": warnings}


def count_folder(folder: Path) -> list[dict[str, object]]:
    """Counts for every executed numbered notebook ``NN_*.ipynb`` in ``folder``."""
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise SystemExit(f"error: {folder} holds no executed notebook (NN_*.ipynb): run the profile first, "
                         f"e.g. python -m utils.runner --profile smoke")
    return [count_notebook(nb) for nb in notebooks]


def format_table(rows: list[dict[str, object]]) -> str:
    """A plain-text table, one row per notebook and a TOTAL row."""
    columns = ["stderr_outputs", "warning_lines", "progress_lines", "other_lines"]
    total = {"notebook": "TOTAL", **{c: sum(int(r[c]) for r in rows) for c in columns}}
    width = max(len(str(r["notebook"])) for r in [*rows, total])
    lines = [f"{'notebook':<{width}}  " + "  ".join(columns)]
    for row in [*rows, total]:
        lines.append(f"{row['notebook']:<{width}}  " + "  ".join(f"{row[c]:>{len(c)}}" for c in columns))
    return "\n".join(lines)


def distinct_warnings(rows: list[dict[str, object]]) -> list[tuple[str, int]]:
    """Each distinct warning line (numbers masked) with how often it appears, most frequent first."""
    counts = Counter(VARIABLE_PART.sub("N", w)[:200] for r in rows for w in r["warnings"])
    return counts.most_common()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--profile", help="count runs/<profile>/ of this checkout")
    where.add_argument("--dir", type=Path, help="count this folder of executed notebooks")
    parser.add_argument("--show", action="store_true", help="also list each distinct warning line")
    args = parser.parse_args(argv)
    folder = args.dir if args.dir else REPO_ROOT / "runs" / args.profile
    rows = count_folder(folder)
    print(f"{folder}\n{format_table(rows)}")
    if args.show:
        for text, n in distinct_warnings(rows):
            print(f"{n:>4} × {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
