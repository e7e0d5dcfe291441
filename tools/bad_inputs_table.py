"""Run every scenario of ``tests/test_bad_inputs.py`` and print the Markdown table of issue #19.

    .venv/bin/python tools/bad_inputs_table.py > /tmp/bad_inputs.md            # every scenario
    .venv/bin/python tools/bad_inputs_table.py --fast                          # without the slow ones
    .venv/bin/python tools/bad_inputs_table.py --only conv- --only life-       # ids starting with these

Columns: number, area, what the user did, the outcome (error / warning / accepted when the scenario's
expectation holds; TRACEBACK, SILENT, UNCLEAR or DATA LOST when it does not) and the first line of the
message the user reads. A count per outcome and the list of failing scenarios follow the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import test_bad_inputs as probe  # noqa: E402  (the scenarios live with their test)

WIDTH = 140


def cell(text: str, width: int = WIDTH) -> str:
    """One table cell: the first line, pipes escaped, cut at ``width`` characters."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    line = line.replace("|", "\\|").replace("`", "'")
    return line if len(line) <= width else line[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="leave out the scenarios marked slow")
    parser.add_argument("--only", action="append", default=[], help="run the ids starting with this (repeatable)")
    args = parser.parse_args(argv)
    chosen = [sc for sc in probe.SCENARIOS if not (args.fast and sc.slow)
              and (not args.only or any(sc.id.startswith(prefix) for prefix in args.only))]
    rows, failed, counts = [], [], Counter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        for n, sc in enumerate(chosen, 1):
            began = time.perf_counter()
            result = probe.perform(sc, Path(tmp) / f"{n:03d}")
            seconds = time.perf_counter() - began
            counts[result.outcome] += 1
            if not result.ok:
                failed.append((n, sc, result))
            mark = "" if result.ok else " ✗"
            rows.append(f"| {n} | {sc.area} | {cell(sc.what, 90)} (`{sc.id}`) | {result.outcome}{mark} | "
                        f"{cell(result.message)} |")
            print(f"[{n}/{len(chosen)}] {sc.id}: {result.outcome} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    print(f"# Bad inputs: {len(chosen)} scenarios, {len(chosen) - len(failed)} as expected "
          f"({time.perf_counter() - start:.0f} s)\n")
    print("| # | area | input / scenario | outcome | message (first line) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n## Count per outcome\n")
    for outcome in probe.OUTCOMES:
        print(f"- {outcome}: {counts.get(outcome, 0)}")
    if failed:
        print("\n## Not as expected\n")
        for n, sc, result in failed:
            print(f"- {n} `{sc.id}` ({sc.area}): {result.outcome}: {cell(result.problem, 200)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
