"""Bring your own data: add ``kind``, ``topic`` and ``keywords`` to a JSONL file from a small CSV the student fills.

``python -m utils.data annotate-template DATA --out fields.csv`` writes one row per example (its line, id and
question, and the fields it already has); the student fills ``kind`` (``fact`` | ``combined`` |
``out_of_scope``), ``topic`` and ``keywords`` (separated by ``;``) in a spreadsheet, and
``python -m utils.data annotate DATA --fields fields.csv --out NEW`` writes a new file with those fields.

The CSV may come back as Excel writes it: UTF-8 with or without a byte-order mark, Windows-1252 ("CSV
(delimitado por comas)" on Windows), UTF-16 ("Texto Unicode"), CRLF line ends, and ``,``, ``;`` (Excel with a
decimal comma, e.g. es-AR) or a tab between cells: the delimiter is read from the header row. Every bad row
gets one message naming the row as the spreadsheet numbers it (the header is row 1) and the fix.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from utils.data.records import (
    KINDS,
    DatasetError,
    answer_of,
    has_field,
    missing_fields,
    normalize_question,
    question_of,
    write_jsonl,
)
from utils.data.validate import ValidationReport, same_file, validate_file
from utils.files import atomic_write_text
from utils.paths import resolve_path

FIELD_COLUMNS = ("kind", "topic", "keywords")
KEY_COLUMNS = ("line", "id")
TEMPLATE_COLUMNS = ("line", "id", "question", *FIELD_COLUMNS)
KEYWORD_SEPARATOR = ";"
DELIMITERS = (",", ";", "\t")  # tried in this order on the header row


@dataclass
class FieldsCsv:
    """A read fields CSV: its data rows (spreadsheet row number, cells by column) and how it was read."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]
    delimiter: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading the CSV as a spreadsheet writes it
# --------------------------------------------------------------------------------------------


def _decode_csv(path: Path) -> tuple[str, list[str]]:
    """The CSV's text and notes on its encoding; ``DatasetError`` when it cannot be read."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory — give the path of the fields CSV") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc}) — check the path of the fields CSV "
                           "(make it with `python -m utils.data annotate-template`)") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), [f"{path.name}: read as UTF-16 (Excel's 'Unicode text')"]
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: neither UTF-8 nor Windows-1252 text — save it again as 'CSV UTF-8 "
                           "(delimitado por comas)'") from None
    return text, [f"{path.name}: not UTF-8, read as Windows-1252 (Excel's plain CSV on Windows); 'CSV UTF-8' "
                  "keeps every character"]


def _detect_delimiter(path: Path, header: str) -> str:
    """The delimiter under which the header row names the most known columns."""
    known = set(TEMPLATE_COLUMNS)
    scores = {d: sum(c.strip().lower() in known for c in next(csv.reader([header], delimiter=d), []))
              for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: scores[d])  # max keeps the first of equal scores
    if scores[best] == 0:
        raise DatasetError(f"{path}: row 1 names none of the columns {', '.join(TEMPLATE_COLUMNS)} — the first "
                           "row must be the header; make the file with `python -m utils.data annotate-template`")
    return best


def read_fields_csv(path: str | Path) -> FieldsCsv:
    """Read a fields CSV (any of the encodings and delimiters Excel writes); check its header."""
    path = Path(path)
    text, notes = _decode_csv(path)
    lines = text.splitlines()
    header_line = next((line for line in lines if line.strip()), "")
    if not header_line:
        raise DatasetError(f"{path}: the file is empty — make it with `python -m utils.data annotate-template`")
    delimiter = _detect_delimiter(path, header_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [c.strip().lower() for c in next(reader)]
    unknown = [c for c in header if c and c not in TEMPLATE_COLUMNS]
    if unknown:
        raise DatasetError(f"{path}: row 1 has unknown columns {unknown} — the columns are "
                           f"{', '.join(TEMPLATE_COLUMNS)}; rename or delete the others")
    if not any(c in header for c in KEY_COLUMNS):
        raise DatasetError(f"{path}: row 1 has neither a 'line' nor an 'id' column — keep one of them (the "
                           "template has both) so each row names its example")
    rows = []
    for number, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        row = {name: value.strip() for name, value in zip(header, cells) if name}
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            row["__extra__"] = str(len(cells))
        rows.append((number, row))
    return FieldsCsv(path, header, rows, delimiter, notes)


# --------------------------------------------------------------------------------------------
# Matching rows to examples and checking their fields
# --------------------------------------------------------------------------------------------


@dataclass
class _Examples:
    """The examples of the data file, findable by line and by id."""

    path: Path
    records: list[dict]
    lines: list[int]
    file_format: str | None = None

    def __post_init__(self) -> None:
        self.by_line = dict(zip(self.lines, range(len(self.records))))
        self.by_id = {str(r["id"]): k for k, r in enumerate(self.records)}

    def span(self) -> str:
        return f"lines {self.lines[0]}–{self.lines[-1]}" if self.lines else "no lines"


def _find_example(row: dict[str, str], examples: _Examples, problems: list[str]) -> int | None:
    """The index of the example a row names by ``line`` and/or ``id``; None after a problem."""
    name = examples.path.name
    line, record_id = row.get("line", ""), row.get("id", "")
    if not line and not record_id:
        problems.append("neither line nor id — fill one of them (the template fills both)")
        return None
    by_line = by_id = None
    if line:
        number = int(line) if line.isdigit() else None
        by_line = examples.by_line.get(number) if number is not None else None
        if number is None:
            problems.append(f"line {line!r} is not a whole number — write the line number of {name}")
        elif by_line is None:
            problems.append(f"line {number} holds no example of {name} (its examples are on {examples.span()}) "
                            "— fix the line number")
    if record_id:
        by_id = examples.by_id.get(record_id)
        if by_id is None:
            problems.append(f"id {record_id!r} is not in {name} — copy the id from the template")
    if by_line is not None and by_id is not None and by_line != by_id:
        problems.append(f"line {line} and id {record_id!r} name different examples (that id is on line "
                        f"{examples.lines[by_id]}) — fix one of them")
        return None
    return None if problems else (by_line if by_line is not None else by_id)


def _fields_of(row: dict[str, str], record: dict, where: str, problems: list[str]) -> dict:
    """The fields a row gives its example (empty cells give nothing), checked against the example."""
    question = row.get("question", "")
    if question and normalize_question(question) != normalize_question(question_of(record["messages"])):
        problems.append(f"its question does not match {where} ({question_of(record['messages'])[:60]!r}) — rows "
                        "out of order? fix line/id, or copy the question again from the data file")
    fields: dict = {}
    kind = row.get("kind", "").lower()
    if kind and kind not in KINDS:
        problems.append(f"kind {row['kind']!r} is not one of {', '.join(KINDS)} — use one of them or leave it "
                        "empty")
    elif kind:
        fields["kind"] = kind
    if row.get("topic"):
        fields["topic"] = row["topic"]
    keywords = [w.strip() for w in row.get("keywords", "").split(KEYWORD_SEPARATOR) if w.strip()]
    answer = normalize_question(answer_of(record["messages"]))
    absent = [w for w in keywords if normalize_question(w) not in answer]
    if absent:
        problems.append(f"keywords {absent} are not in the answer of {where} — a keyword must appear in the "
                        "reference answer (case and accents aside), or keyword recall fails the reference itself; "
                        f"use words of the answer, separated by '{KEYWORD_SEPARATOR}'")
    elif keywords:
        fields["keywords"] = keywords
    return fields


def annotate_records(examples: _Examples, fields_csv: FieldsCsv) -> tuple[list[dict], int]:
    """The examples with the CSV's fields added, and how many were annotated; ``DatasetError`` lists bad rows."""
    annotations: dict[int, dict] = {}
    first_row: dict[int, int] = {}
    errors = []
    for number, row in fields_csv.rows:
        problems: list[str] = []
        if "__extra__" in row:
            problems.append(f"has {row.pop('__extra__')} cells, the header {len(fields_csv.columns)} — a cell "
                            f"holding {fields_csv.delimiter!r} needs double quotes")
        index = _find_example(row, examples, problems)
        if index is not None and index in first_row:
            problems.append(f"names the same example as row {first_row[index]} — keep one row per example")
        elif index is not None:
            first_row[index] = number
            where = f"line {examples.lines[index]} of {examples.path.name}"
            annotations[index] = _fields_of(row, examples.records[index], where, problems)
        if problems:
            errors.append(f"{fields_csv.path.name} row {number}: " + "; ".join(problems))
    if errors:
        raise DatasetError(f"{fields_csv.path}: {len(errors)} rows to fix (nothing was written)\n"
                           + "\n".join(f"  {e}" for e in errors))
    out = []
    for index, record in enumerate(examples.records):
        kept = {k: v for k, v in record.items() if k not in (*FIELD_COLUMNS, "facts") or has_field(record, k)}
        out.append({**kept, **annotations.get(index, {})})
    return out, sum(bool(a) for a in annotations.values())


# --------------------------------------------------------------------------------------------
# The two commands
# --------------------------------------------------------------------------------------------


def _read_examples(data_path: str | Path) -> _Examples:
    """The data file's examples with their lines; ``DatasetError`` with the validator's report if unusable."""
    path = resolve_path(data_path)
    report: ValidationReport = validate_file(path)
    if not report.ok:
        raise DatasetError(report.format())
    return _Examples(path, report.records, report.record_lines, report.file_format)


def _check_output(out: Path, inputs: tuple[Path, ...], force: bool) -> None:
    """Refuse an output that is a folder, one of the inputs, or an existing file (unless ``force``)."""
    if out.is_dir():
        raise DatasetError(f"{out}: is a directory — give the output file's path, e.g. {out / 'data.jsonl'}")
    for source in inputs:
        if out.exists() and same_file(out, source):
            raise DatasetError(f"{out}: the output is an input file ({source}) — choose another output path "
                               "(annotate never writes over its inputs)")
    if out.exists() and not force:
        raise DatasetError(f"{out}: already exists — choose another output path or pass --force")


def write_fields_template(data_path: str | Path, out: str | Path, delimiter: str = ",",
                          force: bool = False) -> Path:
    """Write the fields CSV of a data file: one row per example (line, id, question, its current fields).

    UTF-8 with a byte-order mark and CRLF line ends, so Excel opens it with its accents; ``delimiter`` ``";"``
    suits Excel in locales with a decimal comma (es-AR). Never overwrites the data file, nor another file
    unless ``force``.
    """
    examples = _read_examples(data_path)
    out = Path(out)
    _check_output(out, (examples.path,), force)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(TEMPLATE_COLUMNS)
    for line, record in zip(examples.lines, examples.records):
        current = {k: record[k] if has_field(record, k) else "" for k in FIELD_COLUMNS}
        keywords = f"{KEYWORD_SEPARATOR} ".join(current["keywords"]) if current["keywords"] else ""
        writer.writerow([line, record["id"], question_of(record["messages"]), current["kind"], current["topic"],
                         keywords])
    return atomic_write_text(out, buffer.getvalue(), encoding="utf-8-sig")


def annotate_file(data_path: str | Path, fields_path: str | Path, out: str | Path,
                  force: bool = False) -> dict:
    """Write ``out``: the data file's examples (messages format) with the CSV's kind, topic and keywords added.

    Never writes over the data file or the CSV; writes atomically. Returns ``records``, ``annotated`` (examples
    that got a field), ``missing`` (fields some example still lacks), ``notes`` and ``path``.
    """
    examples = _read_examples(data_path)
    fields_path, out = resolve_path(fields_path), Path(out)
    _check_output(out, (examples.path, fields_path), force)
    fields_csv = read_fields_csv(fields_path)
    records, annotated = annotate_records(examples, fields_csv)
    try:
        write_jsonl(records, out)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(f"{out}: cannot write ({reason}) — nothing was changed; free disk space, check the "
                           "folder's permissions or choose another path") from exc
    notes = list(fields_csv.notes)
    if examples.file_format == "text":
        notes.append(f"{examples.path.name} is in the original text format, which has no place for these fields: "
                     f"{out.name} is in the messages format (training and the notebooks read both)")
    return {"records": len(records), "annotated": annotated, "path": str(out), "notes": notes,
            "missing": missing_fields(records, FIELD_COLUMNS)}
