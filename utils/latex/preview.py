r"""A preview document per profile (every figure and table at thesis size) and its pdflatex build and log check.

``python -m utils.latex preview --profile demo`` writes ``preview.tex`` into the profile's figures folder;
``python -m utils.latex build --profile demo`` compiles it twice with pdflatex and fails (exit 1, one line per
problem) on any LaTeX error, any overfull box over 1 pt, or any character missing from the font.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from utils.files import atomic_write_text

PREVIEW_NAME = "preview"
FIGURES_TEX = "figuras.tex"
TABLE_PATTERN = re.compile(r"^\d\d_.+\.tex$")
OVERFULL_LIMIT_PT = 1.0
# The preamble a thesis needs: A4 with 2.5 cm margins (16 cm of text), Spanish (shorthands left on, as a thesis
# has them), T1 fonts, and the packages the tables and figures use.
PREAMBLE = r"""\documentclass[11pt,a4paper]{report}
\usepackage[a4paper,margin=2.5cm]{geometry}
\usepackage[T1]{fontenc}
\usepackage{lmodern}
\usepackage[spanish,es-tabla]{babel}
\usepackage{booktabs,longtable,array,graphicx,url,ragged2e}
\usepackage{caption}
\usepackage[hidelinks]{hyperref}
\graphicspath{{./}}
\extrafloats{100}
\tracinglostchars=2
\begin{document}
"""
AUXILIARY_SUFFIXES = (".aux", ".out", ".toc", ".lof", ".lot")


@dataclass
class LogSummary:
    """What a pdflatex log says: errors, overfull and underfull boxes (with their size), missing glyphs."""

    errors: list[str] = field(default_factory=list)
    overfull: list[tuple[float, str]] = field(default_factory=list)
    underfull: list[str] = field(default_factory=list)
    missing_chars: list[str] = field(default_factory=list)
    undefined: list[str] = field(default_factory=list)

    def problems(self, limit_pt: float = OVERFULL_LIMIT_PT) -> list[str]:
        """One line per thing that fails the build: errors, overfull boxes over ``limit_pt``, missing glyphs."""
        lines = [f"error: {e}" for e in self.errors]
        lines += [f"overfull box {size:.1f} pt: {where}" for size, where in self.overfull if size > limit_pt]
        lines += [f"missing character: {m}" for m in self.missing_chars]
        lines += [f"undefined reference: {u}" for u in self.undefined]
        return lines

    def describe(self) -> str:
        """One line: counts of errors, overfull boxes (and the largest), underfull boxes, missing characters."""
        largest = max((size for size, _ in self.overfull), default=0.0)
        over = sum(size > OVERFULL_LIMIT_PT for size, _ in self.overfull)
        return (f"errors: {len(self.errors)}; overfull boxes: {len(self.overfull)} (over {OVERFULL_LIMIT_PT:g} pt: "
                f"{over}; largest {largest:.2f} pt); underfull boxes: {len(self.underfull)}; missing characters: "
                f"{len(self.missing_chars)}; undefined references: {len(self.undefined)}")


def list_tables(folder: Path) -> list[Path]:
    """The ``NN_*.tex`` tables of a figures folder, in name order (the preview itself excluded)."""
    return sorted(p for p in folder.glob("*.tex") if TABLE_PATTERN.match(p.name))


def render_preview(folder: Path) -> str:
    """The text of ``preview.tex`` for ``folder``: its ``figuras.tex`` and every ``NN_*.tex`` table."""
    folder = Path(folder)
    parts = [PREAMBLE]
    if (folder / FIGURES_TEX).exists():
        parts.append(f"\\chapter*{{Figuras}}\n\\input{{{FIGURES_TEX}}}\n\\clearpage\n")
    tables = list_tables(folder)
    if tables:
        parts.append("\\chapter*{Tablas}\n")
        parts += [f"\\input{{{t.name}}}\n\\clearpage\n" for t in tables]
    if len(parts) == 1:
        parts.append("Esta carpeta no tiene figuras ni tablas todavía.\n")
    parts.append("\\end{document}\n")
    return "".join(parts)


def write_preview(folder: Path) -> Path:
    """Write ``<folder>/preview.tex`` (atomically) and return its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: run the notebooks of this profile first "
                                "(make run PROFILE=...) or pass --dir with a folder that has figures")
    return atomic_write_text(folder / f"{PREVIEW_NAME}.tex", render_preview(folder))


def tex_version(pdflatex: str = "pdflatex") -> str:
    """The first line of ``pdflatex --version`` (e.g. ``pdfTeX 3.14…-1.40.24 (TeX Live 2022/Debian)``)."""
    out = subprocess.run([pdflatex, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


_OVERFULL = re.compile(r"^Overfull \\[hv]box \((?P<size>[\d.]+)pt too (?:wide|high)\) (?P<where>.*)$")
_UNDERFULL = re.compile(r"^Underfull \\[hv]box \((?P<badness>badness \d+)\) (?P<where>.*)$")
_ERROR = re.compile(r"^(?:! (?P<msg>.+)|(?P<file>[^\s:]+\.tex):(?P<line>\d+): (?P<fmsg>.+))$")
_MISSING = re.compile(r"^Missing character: (?P<what>.+)$")
_UNDEFINED = re.compile(r"^LaTeX Warning: (?:Reference|Citation) (?P<what>.+) undefined")


_FILE_OPEN = re.compile(r"\((\.{0,2}/[^\s()]+|[^\s()]+\.(?:tex|sty|cls|clo|cfg|def|fd|aux|out|toc|lof|lot))")


def _track_files(line: str, stack: list[str | None]) -> None:
    """Update the stack of open input files from one log line: ``(./file.tex`` opens, ``)`` closes."""
    pos = 0
    while pos < len(line):
        if line[pos] == "(":
            match = _FILE_OPEN.match(line, pos)
            stack.append(Path(match[1]).name if match else None)
            pos = match.end() if match else pos + 1
        else:
            if line[pos] == ")" and stack:
                stack.pop()
            pos += 1


def parse_log(text: str) -> LogSummary:
    """Read a pdflatex log (written with ``max_print_line`` large, so that no message is wrapped).

    Each box is reported with the input file it sits in (``03_claims.tex: in paragraph at lines 8--9``). The box
    contents TeX prints after a box warning (typeset text, with its own parentheses) are skipped until the blank
    line that ends them.
    """
    summary = LogSummary()
    stack: list[str | None] = []
    showing_box = False
    for line in text.splitlines():
        if showing_box:
            showing_box = bool(line.strip())
            continue
        where = next((name for name in reversed(stack) if name), "?")
        if m := _OVERFULL.match(line):
            summary.overfull.append((float(m["size"]), f"{where}: {m['where']}"))
            showing_box = True
        elif m := _UNDERFULL.match(line):
            summary.underfull.append(f"{where}: {m['badness']} {m['where']}")
            showing_box = True
        elif m := _ERROR.match(line):
            message = m["msg"] or f"{m['file']}:{m['line']}: {m['fmsg']}"
            if message not in summary.errors:
                summary.errors.append(message)
        elif m := _MISSING.match(line):
            summary.missing_chars.append(f"{where}: {m['what']}")
        elif m := _UNDEFINED.match(line):
            summary.undefined.append(m["what"])
        else:
            _track_files(line, stack)
    return summary


def run_pdflatex(folder: Path, name: str = PREVIEW_NAME, pdflatex: str = "pdflatex", runs: int = 2,
                 timeout_s: float = 300) -> LogSummary:
    """Compile ``<folder>/<name>.tex`` ``runs`` times and summarise the last log; auxiliary files are removed."""
    folder = Path(folder)
    env = {**os.environ, "max_print_line": "100000", "error_line": "254", "half_error_line": "238"}
    command = [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "-file-line-error", f"{name}.tex"]
    try:
        for _ in range(runs):
            result = subprocess.run(command, cwd=folder, env=env, capture_output=True, timeout=timeout_s)
            if result.returncode != 0:
                break
        log = (folder / f"{name}.log").read_text(encoding="latin-1")
    finally:
        for suffix in AUXILIARY_SUFFIXES:
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
    summary = parse_log(log)
    if result.returncode != 0 and not summary.errors:
        summary.errors.append(f"pdflatex exited with {result.returncode}; see {folder / (name + '.log')}")
    return summary


def find_pdflatex() -> str | None:
    """The pdflatex executable on PATH, or None."""
    return shutil.which("pdflatex")
