r"""Thesis tables as LaTeX that a thesis can ``\input`` as it is: booktabs, ragged-right ``p`` columns, escaped cells.

``write_table(table, "03_claims", caption=..., widths=[0.2, 0.2, 0.3, 0.3])`` writes ``figures_dir()/03_claims.tex``.
The caller formats every number with ``utils.numbers`` (es-AR) before; this module only escapes and lays out:

- every LaTeX special character is escaped (``~`` prints as ``$\sim$``, a non-breaking space stays one);
- column widths are fractions of ``\linewidth`` (sum at most 1) with the column padding taken off each, so the
  table is never wider than the text;
- a word longer than its column (a path, a URL, a degenerate answer "2000000…") gets break points, and the
  columns named in ``path_columns`` print as ``\path{}`` (url package), which breaks after ``/``, ``.``, ``_``;
- ``long=True`` writes a ``longtable`` that breaks across pages and repeats its header.

The preamble a thesis needs for these files: ``\usepackage[T1]{fontenc}``, ``\usepackage[spanish]{babel}``,
``\usepackage{booktabs,longtable,array,url}`` (``python -m utils.latex preview`` writes a document that has them).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from utils.files import atomic_write_text
from utils.numbers import MISSING, fmt_num
from utils.paths import figures_dir

__all__ = ["latex_escape", "write_table", "column_spec", "TEXT_WIDTH_PT", "PREAMBLE_PACKAGES"]

# 16 cm of text (A4 with 2.5 cm margins) in TeX points, and the padding LaTeX puts on each side of a column.
TEXT_WIDTH_PT = 16 / 2.54 * 72.27
TABCOLSEP_PT = 6.0
# The widest a character of \small can be on average in a 12 pt document (digits are 0.5 em of 10.95 pt):
# a word with more characters than fit gets break points.
CHAR_WIDTH_PT = 6.0
# A word of letters only is left to hyphenation up to this length (no Spanish word is longer).
LONGEST_WORD = 30
PREAMBLE_PACKAGES = ("booktabs", "longtable", "array", "url")

_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "_": r"\_",
    "%": r"\%", "^": r"\textasciicircum{}", "~": r"$\sim$", "<": r"\textless{}", ">": r"\textgreater{}",
    '"': r"\textquotedbl{}", "|": r"\textbar{}", "`": r"\textasciigrave{}",
    "\u00a0": r"\nobreakspace{}", "\u00ad": r"\-", "\u200b": r"\allowbreak{}", "\ufeff": "",
    "\t": " ", "\n": r"\newline{}",
    # Characters pdflatex's utf8 input has no definition for: their math or text equivalent.
    "\u2212": "$-$", "\u2248": r"$\approx$", "\u2264": r"$\leq$", "\u2265": r"$\geq$", "\u2260": r"$\neq$",
    "\u221e": r"$\infty$", "\u2194": r"$\leftrightarrow$", "\u21d2": r"$\Rightarrow$", "\u2208": r"$\in$",
    "\u00b7": r"\textperiodcentered{}", "\u2032": "$'$", "\u2211": r"$\sum$", "\u221a": r"$\surd$",
    "\u2009": r"\,", "\u202f": r"\,", "\u2007": r"\enspace{}", "\u2002": r"\enspace{}", "\u2003": r"\quad{}",
    "\u2713": r"$\surd$", "\u2717": r"$\times$", "\u223c": r"$\sim$",
}
_GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho varsigma sigma "
          "tau upsilon phi chi psi omega").split()
_SPECIAL.update({chr(0x3B1 + i): f"$\\{name}$" for i, name in enumerate(_GREEK) if name not in ("omicron",)})
_SPECIAL["\u03bf"] = "o"
# Superscript and subscript digits (10⁶ bytes, H₂O): ¹²³ are in Latin-1 and typeset as they are.
_SUPERSCRIPTS = dict(zip("\u2070\u2074\u2075\u2076\u2077\u2078\u2079\u207a\u207b", "0456789+-"))
_SPECIAL.update({ch: f"\\textsuperscript{{{text}}}" for ch, text in _SUPERSCRIPTS.items()})
_SPECIAL.update({chr(0x2080 + d): f"\\textsubscript{{{d}}}" for d in range(10)})
# Code points that LaTeX's utf8 input (utf8enc.dfu, TeX Live 2022) types with T1/TS1 fonts (Cyrillic left out:
# it needs T2A fonts). Anything else is written as its code, [U+XXXX], instead of stopping the build.
_TYPESET_RANGES = (
    (0x00A0, 0x00AC), (0x00AE, 0x0125), (0x0128, 0x0137), (0x0139, 0x013E), (0x0141, 0x0148), (0x014A, 0x0165),
    (0x0168, 0x017E), (0x0192, 0x0192), (0x01C4, 0x01D4), (0x01E2, 0x01E3), (0x01E6, 0x01EB), (0x01F4, 0x01F5),
    (0x0218, 0x021B), (0x0232, 0x0233), (0x0237, 0x0237), (0x02C6, 0x02C7), (0x02D8, 0x02D9), (0x02DB, 0x02DD),
    (0x1E02, 0x1E03), (0x1E1E, 0x1E21), (0x1E9E, 0x1E9E), (0x2010, 0x2016), (0x2018, 0x201A), (0x201C, 0x201E),
    (0x2020, 0x2022), (0x2026, 0x2026), (0x2030, 0x2031), (0x2039, 0x203A), (0x2044, 0x2044), (0x20AC, 0x20AC),
    (0x2103, 0x2103), (0x2116, 0x2116), (0x2122, 0x2122), (0x2126, 0x2126), (0x2190, 0x2193), (0xFB00, 0xFB06),
)
# Pairs that T1 fonts join into one glyph (-- is an en dash, '' a closing quote, ,, a low quote).
_LIGATURE_PAIRS = {("-", "-"), ("'", "'"), (",", ",")}
_BREAK_AFTER = set("/\\_.-:,;=&?+")
_PATH_DELIMITERS = "|!+=@"
_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_\-]*$")
# A number as utils.numbers writes it (3.213.004.800, 1,491, -0,5×): never broken inside, however narrow the
# column (a break after a thousands point misreads it); one too wide shows up as an overfull box instead.
_NUMBER = re.compile(r"^[-+\u2212]?\d{1,3}(\.\d{3})*(,\d{1,12})?[%×]?$")
_PATH_LIKE = re.compile(r"[/\\]")


def _typeset(ch: str) -> bool:
    code = ord(ch)
    return 0x20 <= code < 0x7F or any(lo <= code <= hi for lo, hi in _TYPESET_RANGES)


def _escape_char(ch: str) -> str:
    if ch in _SPECIAL:
        return _SPECIAL[ch]
    if _typeset(ch):
        return ch
    if unicodedata.category(ch).startswith(("C", "Z")):
        return " " if unicodedata.category(ch).startswith("Z") else ""  # other spaces; control characters
    return f"[U+{ord(ch):04X}]\\allowbreak{{}}"  # a line may break after each code: a run of them has no space


def _escape_chars(text: str, separator: str = "", every: int = 1) -> str:
    """Escape ``text`` character by character, ligatures broken, ``separator`` after every ``every`` characters."""
    out: list[str] = []
    previous = ""
    for count, ch in enumerate(unicodedata.normalize("NFC", text)):
        if count and separator and count % every == 0:
            out.append(separator)
        elif (previous, ch) in _LIGATURE_PAIRS:
            out.append("{}")
        out.append(_escape_char(ch))
        previous = ch
    return "".join(out)


def latex_escape(text: str) -> str:
    r"""``text`` with every LaTeX special character escaped, safe in a ``tabular`` cell, a caption or prose.

    ``~`` prints as ``$\sim$``; a non-breaking space (``utils.numbers`` joins number and unit with one) stays
    non-breaking; ``--`` stays two hyphens; a character pdflatex cannot typeset is written as ``[U+XXXX]``.
    """
    return _escape_chars(str(text))


def _break_word(word: str, capacity: int) -> str:
    """A word too long for its column, escaped with break points: after separators, or anywhere if needed."""
    every = max(1, min(8, capacity // 2))  # a piece fits in half the column, so any line can take one
    if word.isalpha():
        # Letters only (a Spanish word or a degenerate "aaaa…"): hyphenation handles up to LONGEST_WORD.
        return _escape_chars(word) if len(word) <= LONGEST_WORD else _escape_chars(word, r"\-", every)
    segments = re.findall(r"[^/\\_.\-:,;=&?+]*[/\\_.\-:,;=&?+]?", word)
    parts = [_escape_chars(s, r"\allowbreak{}" if len(s) > capacity else "", every) for s in segments if s]
    return r"\allowbreak{}".join(parts)


def escape_breakable(text: str, capacity: int) -> str:
    """``text`` escaped, every word longer than ``capacity`` characters given break points (see ``_break_word``)."""
    out = []
    # Stripped: a cell that began with \newline would stop LaTeX ("There's no line here to end").
    for token in re.split(r"(\s+)", unicodedata.normalize("NFC", text).strip()):
        if not token:
            continue
        if token.isspace():
            # A blank line would end the paragraph (and the cell): one line break at most.
            if "\n" in token:
                out.append(r"\newline{}")
            else:  # ordinary spaces collapse to one; a non-breaking or thin space alone stays what it is
                out.append(" " if set(token) & set(" \t\r\f\v") else _escape_chars(token))
        elif _NUMBER.match(token):
            out.append(_escape_chars(token))
        elif len(token) > capacity or _PATH_LIKE.search(token):  # a path may break after each / even if short
            out.append(_break_word(token, capacity))
        else:
            out.append(_escape_chars(token))
    return "".join(out)


def _capacity(fraction: float) -> int:
    """How many characters of ``\\small`` surely fit on one line of a column ``fraction`` of the text wide."""
    return max(2, int((fraction * TEXT_WIDTH_PT - 2 * TABCOLSEP_PT) / CHAR_WIDTH_PT))


def format_path(path: str, capacity: int) -> str:
    r"""A path that breaks after ``/``, ``.``, ``_``: ``\path{}``, or escaped typewriter text with break points.

    ``\path`` reads its argument verbatim; it is used when the path is ASCII and no part between separators is
    longer than the column, else the path is escaped by hand (``\path`` cannot type UTF-8 under pdflatex).
    """
    path = str(path).strip()
    if not path:
        return ""
    longest_part = max(len(p) for p in re.split(r"[/\\_.\-]", path))
    if path.isascii() and path.isprintable() and longest_part <= capacity:
        if "{" not in path and "}" not in path:
            return f"\\path{{{path}}}"
        delimiter = next((d for d in _PATH_DELIMITERS if d not in path), None)
        if delimiter:
            return f"\\path{delimiter}{path}{delimiter}"
    return r"\texttt{" + _break_word(path.replace(" ", "\u00a0"), capacity).replace(r"\-", r"\allowbreak{}") + "}"


def column_spec(fraction: float, align: str = "left") -> str:
    r"""One ``p`` column ``fraction`` of ``\linewidth`` wide including its padding, ragged right (or left).

    ``\hspace{0pt}`` lets TeX hyphenate the first word of a cell, which it otherwise never does.
    """
    flush = r"\raggedleft" if align == "right" else r"\raggedright"
    return (f">{{{flush}\\arraybackslash\\hspace{{0pt}}}}"
            f"p{{\\dimexpr {fraction:.4f}\\linewidth-2\\tabcolsep\\relax}}")


def _cell_text(value: object, column: str, row: int) -> str:
    """A cell as the text to print: strings as they are, integers grouped es-AR, missing values as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError(f"write_table: column {column!r}, row {row}: {value!r} is a bool; write 'sí'/'no' "
                        "(or what the column means) as a string")
    if isinstance(value, int) or (hasattr(value, "dtype") and str(getattr(value, "dtype", "")).startswith("int")):
        return fmt_num(int(value))
    if isinstance(value, float) or str(getattr(value, "dtype", "")).startswith("float"):
        raise TypeError(f"write_table: column {column!r}, row {row}: the number {value!r} is not formatted; pass "
                        "a string made with utils.numbers (fmt_num, fmt_pct, fmt_unit) so it prints in es-AR")
    return str(value)


def _check_widths(widths: Sequence[float], columns: Sequence[str], name: str) -> list[float]:
    widths = [float(w) for w in widths]
    if len(widths) != len(columns):
        raise ValueError(f"write_table({name!r}): {len(widths)} widths for {len(columns)} columns "
                         f"({', '.join(map(str, columns))}); give one width (a fraction of \\linewidth) per column")
    if any(not w > 0 for w in widths):
        raise ValueError(f"write_table({name!r}): widths must be positive fractions of \\linewidth, got {widths}")
    if sum(widths) > 1 + 1e-9:
        raise ValueError(f"write_table({name!r}): widths add up to {sum(widths):.3f} > 1, the table would be "
                         "wider than the text; make them add up to 1 at most")
    return widths


def _render_rows(table: pd.DataFrame, widths: list[float], path_columns: set[str]) -> list[str]:
    """The body rows, each ``cell & cell & … \\``, every cell escaped and given break points."""
    capacities = [_capacity(w) for w in widths]
    rows = []
    for index, record in enumerate(table.itertuples(index=False, name=None)):
        cells = []
        for column, value, capacity in zip(table.columns, record, capacities):
            text = _cell_text(value, str(column), index)
            is_path = str(column) in path_columns and text != MISSING
            cells.append(format_path(text, capacity) if is_path else escape_breakable(text, capacity))
        rows.append(" & ".join(cells) + r" \\")
    return rows


def _header(table: pd.DataFrame, widths: list[float]) -> str:
    cells = [escape_breakable(str(c), _capacity(w)) for c, w in zip(table.columns, widths)]
    return " & ".join(cells) + r" \\"


def _float_table(spec: str, caption: str, label: str, header: str, rows: list[str], notes: str) -> list[str]:
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small", f"\\caption{{{caption}}}", f"\\label{{{label}}}",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule", header, r"\midrule", *rows, r"\bottomrule",
             r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip", f"{{\\footnotesize\\raggedright {notes}\\par}}"]
    return lines + [r"\end{table}"]


def _long_table(spec: str, ncols: int, caption: str, label: str, header: str, rows: list[str],
                notes: str) -> list[str]:
    lines = [r"\begingroup", r"\small", r"\setlength{\LTcapwidth}{\linewidth}",
             f"\\begin{{longtable}}{{{spec}}}",
             f"\\caption{{{caption}}}\\label{{{label}}} \\\\", r"\toprule", header, r"\midrule", r"\endfirsthead",
             r"\caption[]{(continuación)} \\", r"\toprule", header, r"\midrule", r"\endhead",
             r"\midrule", f"\\multicolumn{{{ncols}}}{{r}}{{\\footnotesize Continúa en la página siguiente}} \\\\",
             r"\endfoot", r"\bottomrule", r"\endlastfoot", *rows, r"\end{longtable}"]
    if notes:
        lines += [f"{{\\footnotesize\\raggedright\\noindent {notes}\\par}}"]
    return lines + [r"\endgroup"]


def write_table(table: pd.DataFrame, name: str, *, caption: str, widths: Sequence[float], label: str | None = None,
                long: bool = False, notes: str | None = None, path_columns: Sequence[str] = (),
                align_right: Sequence[str] = (), directory: str | Path | None = None) -> Path:
    r"""Write ``table`` as ``<directory or figures_dir()>/<name>.tex`` for a thesis to ``\input``; return the path.

    ``widths``: one fraction of ``\linewidth`` per column (sum at most 1; each includes the column's padding).
    Cells are strings formatted by the caller with ``utils.numbers`` (integers are grouped here; an unformatted
    float is refused). ``caption`` and ``notes`` are plain Spanish text (escaped here); ``notes`` prints under
    the table in small type. ``path_columns`` print as breakable paths; ``align_right`` columns (numbers) flush
    right. ``long=True`` writes a ``longtable`` that breaks across pages. The write is atomic; no timestamp.
    """
    if not _NAME.match(name):
        raise ValueError(f"write_table: name {name!r} must be a file stem like '03_claims' (letters, digits, _ -)")
    columns = [str(c) for c in table.columns]
    unknown = sorted(set(path_columns) - set(columns)) + sorted(set(align_right) - set(columns))
    if unknown:
        raise ValueError(f"write_table({name!r}): no column {', '.join(map(repr, unknown))} in the table "
                         f"(columns: {', '.join(columns)})")
    widths = _check_widths(widths, columns, name)
    spec = "".join(column_spec(w, "right" if c in set(align_right) else "left") for c, w in zip(columns, widths))
    full = _capacity(1.0)
    caption_tex = escape_breakable(caption.strip(), full)
    notes_tex = escape_breakable(notes.strip(), full) if notes else ""
    header, rows = _header(table, widths), _render_rows(table, widths, set(path_columns))
    label = label or f"tab:{name}"
    if long:
        body = _long_table(spec, len(columns), caption_tex, label, header, rows, notes_tex)
    else:
        body = _float_table(spec, caption_tex, label, header, rows, notes_tex)
    packages = ",".join(PREAMBLE_PACKAGES if long else [p for p in PREAMBLE_PACKAGES if p != "longtable"])
    head = [f"% {name}.tex, written by utils.latex.write_table (regenerate it; do not edit by hand).",
            f"% UTF-8. Preamble: \\usepackage[T1]{{fontenc}}, \\usepackage[spanish]{{babel}}, "
            f"\\usepackage{{{packages}}}."]
    target = Path(directory) if directory is not None else figures_dir()
    return atomic_write_text(target / f"{name}.tex", "\n".join(head + body) + "\n")
