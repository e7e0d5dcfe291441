"""Bring your own data (#21): which fields a file lacks, and adding kind, topic and keywords from a CSV.

The CSV comes back from a spreadsheet as Excel writes it on Windows: CRLF line ends, UTF-8 with a BOM,
Windows-1252, UTF-16 with tabs, and ``;`` between cells where the decimal mark is a comma (es-AR).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest

from utils import data
from utils.reports import data as data_report

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FIELDS = ("keywords", "kind", "topic")
# What a student writes for the five examples of original_text.jsonl (each keyword is in its answer).
FILLED = {
    1: ("fact", "reglamento_grado", "1549; 2017"),
    2: ("fact", "reglamento_grado", "10 capítulos"),
    3: ("fact", "reglamento_anterior", "908;710"),
    4: ("combined", "reglamento_anterior", "1999"),
    5: ("out_of_scope", "equivalencias", "Secretaría Académica"),
}


@pytest.fixture()
def own_data(tmp_path: Path) -> Path:
    """The student's file: the original text format, no metadata."""
    path = tmp_path / "mis_datos.jsonl"
    shutil.copyfile(FIXTURES / "original_text.jsonl", path)
    return path


def template_rows(own: Path, tmp_path: Path) -> list[list[str]]:
    """The rows of the template the command writes for ``own`` (header first)."""
    out = tmp_path / "plantilla.csv"
    assert data.main(["annotate-template", str(own), "--out", str(out)]) == 0
    return list(csv.reader(io.StringIO(out.read_text(encoding="utf-8-sig"), newline="")))


def filled_csv(rows: list[list[str]], *, delimiter: str = ",", newline: str = "\r\n",
               drop: tuple[str, ...] = ()) -> str:
    """The template with FILLED written in, as a spreadsheet saves it (``drop``: columns deleted)."""
    header = rows[0]
    keep = [k for k, name in enumerate(header) if name not in drop]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    writer.writerow([header[k] for k in keep])
    for row in rows[1:]:
        row = row[:3] + list(FILLED[int(row[0])])
        writer.writerow([row[k] for k in keep])
    return buffer.getvalue()


def annotate(own: Path, fields: Path, out: Path, *extra: str) -> int:
    return data.main(["annotate", str(own), "--fields", str(fields), "--out", str(out), *extra])


# --------------------------------------------------------------------------------------------
# missing_fields
# --------------------------------------------------------------------------------------------


def test_missing_fields_on_text_format_data_names_every_metadata_field(own_data):
    records = data.load_records(own_data)
    assert data.missing_fields(records, FIELDS) == list(FIELDS)
    assert data.missing_fields(records, ("id", "messages")) == []


def test_missing_fields_counts_a_field_missing_from_one_record_only():
    records = data.load_records(FIXTURES / "clean_messages.jsonl")
    assert data.missing_fields(records, ("kind", "topic")) == []
    damaged = [dict(records[0], keywords=[]), *records[1:]]
    assert data.missing_fields(damaged, ("topic", "keywords")) == ["keywords"]
    raw = [{"messages": [], "kind": "fact"}, {"messages": []}]  # raw JSON objects, not loaded records
    assert data.missing_fields(raw, ("kind", "topic")) == ["kind", "topic"]


def test_an_out_of_scope_record_has_its_empty_facts():
    base = {"messages": [], "topic": "t", "keywords": ["no establece"]}
    assert data.missing_fields([dict(base, kind="out_of_scope", facts=[])], ("facts",)) == []
    assert data.missing_fields([dict(base, kind="fact", facts=[])], ("facts",)) == ["facts"]


# --------------------------------------------------------------------------------------------
# The template and the round trip
# --------------------------------------------------------------------------------------------


def test_template_lists_every_example_with_line_id_and_question(own_data, tmp_path):
    rows = template_rows(own_data, tmp_path)
    assert rows[0] == ["line", "id", "question", "kind", "topic", "keywords"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert rows[1][1:] == ["mis_datos-1", "¿Qué ordenanza rige las carreras de grado desde 2017?", "", "", ""]
    raw = (tmp_path / "plantilla.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # Excel opens it with its accents


def test_template_carries_the_fields_a_file_already_has(tmp_path):
    out = tmp_path / "campos.csv"
    data.write_fields_template(FIXTURES / "clean_messages.jsonl", out, delimiter=";")
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8-sig"), newline=""), delimiter=";"))
    assert rows[1][3:] == ["fact", "reglamento_grado", "1549"]


def test_template_refuses_to_overwrite_without_force(own_data, tmp_path, capsys):
    out = tmp_path / "campos.csv"
    out.write_text("mine", encoding="utf-8")
    assert data.main(["annotate-template", str(own_data), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "mine"
    assert data.main(["annotate-template", str(own_data), "--out", str(own_data), "--force"]) == 2
    assert "never writes over its inputs" in capsys.readouterr().err


EXCEL_SAVES = [
    pytest.param("utf-8-sig", ",", "\r\n", id="csv-utf8-bom-crlf"),
    pytest.param("utf-8-sig", ";", "\r\n", id="es-AR-semicolon-utf8-bom"),
    pytest.param("cp1252", ";", "\r\n", id="es-AR-semicolon-windows-1252"),
    pytest.param("cp1252", ",", "\r\n", id="windows-1252-crlf"),
    pytest.param("utf-16", "\t", "\r\n", id="unicode-text-utf16-tab"),
    pytest.param("utf-8", ",", "\n", id="plain-utf8-lf"),
]


@pytest.mark.parametrize("encoding,delimiter,newline", EXCEL_SAVES)
def test_annotate_reads_the_csv_as_excel_saves_it(own_data, tmp_path, encoding, delimiter, newline, capsys):
    fields = tmp_path / "campos.csv"
    fields.write_bytes(filled_csv(template_rows(own_data, tmp_path), delimiter=delimiter,
                                  newline=newline).encode(encoding))
    before = own_data.read_bytes()
    out = tmp_path / "anotados.jsonl"
    assert annotate(own_data, fields, out) == 0, capsys.readouterr().err
    assert own_data.read_bytes() == before  # the input is never touched
    records = data.load_records(out)
    assert data.missing_fields(records, FIELDS) == []
    assert [(r["kind"], r["topic"], r["keywords"]) for r in records][:3] == [
        ("fact", "reglamento_grado", ["1549", "2017"]), ("fact", "reglamento_grado", ["10 capítulos"]),
        ("fact", "reglamento_anterior", ["908", "710"])]
    assert records[4]["keywords"] == ["Secretaría Académica"]
    assert [r["messages"] for r in records] == [r["messages"] for r in data.load_records(own_data)]
    printed = capsys.readouterr()
    assert "5 examples, 5 annotated" in printed.out and "warning" not in printed.err


def test_rows_matched_by_id_alone_in_any_order(own_data, tmp_path):
    text = filled_csv(template_rows(own_data, tmp_path), drop=("line",))
    header, *rows = text.splitlines()
    fields = tmp_path / "campos.csv"
    fields.write_text("\n".join([header, *reversed(rows)]) + "\n", encoding="utf-8")
    data.annotate_file(own_data, fields, tmp_path / "out.jsonl")
    assert [r["kind"] for r in data.load_records(tmp_path / "out.jsonl")] == [FILLED[n][0] for n in range(1, 6)]


def test_a_partly_filled_csv_writes_and_warns_what_is_still_missing(own_data, tmp_path, capsys):
    rows = template_rows(own_data, tmp_path)
    fields = tmp_path / "campos.csv"
    text = filled_csv(rows).splitlines()
    fields.write_text("\n".join(text[:3]) + "\n", encoding="utf-8")  # only the first two examples
    assert annotate(own_data, fields, tmp_path / "out.jsonl") == 0
    err = capsys.readouterr().err
    assert "still lack kind, topic, keywords" in err
    records = data.load_records(tmp_path / "out.jsonl")
    assert records[0]["kind"] == "fact" and records[2]["kind"] == data.DEFAULT_KIND
    assert '"kind"' not in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[2]


# --------------------------------------------------------------------------------------------
# Bad rows: one message each, naming the row and the fix; nothing written
# --------------------------------------------------------------------------------------------

BAD_ROWS = (
    "line,id,question,kind,topic,keywords\r\n"
    "1,mis_datos-1,¿Qué ordenanza rige las carreras de grado desde 2017?,hecho,reglamento_grado,1549\r\n"
    "2,,¿Cuántos capítulos tiene la Ord. 1549?,fact,reglamento_grado,once capítulos\r\n"
    "9,,,fact,x,\r\n"
    "dos,,,fact,x,\r\n"
    ",mis_datos-77,,fact,x,\r\n"
    "3,mis_datos-4,,fact,x,\r\n"
    "4,,¿Cuántos capítulos tiene la Ord. 1549?,fact,x,1999\r\n"
    "1,,,fact,x,\r\n"
    ",,,fact,x,\r\n"
    "5,mis_datos-5,¿Dónde se piden las equivalencias en FR San Francisco?,fact,x,1549,extra\r\n"
)
EXPECTED = {
    2: "kind 'hecho' is not one of fact, combined, out_of_scope",
    3: "keywords ['once capítulos'] are not in the answer of line 2",
    4: "line 9 holds no example of mis_datos.jsonl (its examples are on lines 1–5)",
    5: "line 'dos' is not a whole number",
    6: "id 'mis_datos-77' is not in mis_datos.jsonl",
    7: "line 3 and id 'mis_datos-4' name different examples (that id is on line 4)",
    8: "its question does not match line 4",
    9: "names the same example as row 2",
    10: "neither line nor id",
    11: "has 7 cells, the header 6",
}


def test_each_bad_row_gets_one_message_with_its_row_and_fix(own_data, tmp_path, capsys):
    fields = tmp_path / "campos.csv"
    fields.write_bytes(BAD_ROWS.encode("utf-8"))
    out = tmp_path / "out.jsonl"
    assert annotate(own_data, fields, out) == 2
    err = capsys.readouterr().err
    assert f"{len(EXPECTED)} rows to fix (nothing was written)" in err
    lines = [line.strip() for line in err.splitlines() if "campos.csv row " in line]
    assert len(lines) == len(EXPECTED), err
    for (row, fragment), line in zip(EXPECTED.items(), lines):
        assert line.startswith(f"campos.csv row {row}: ") and fragment in line and " — " in line, line
    assert not out.exists()


@pytest.mark.parametrize("header,fragment", [
    ("linea,pregunta,tipo\r\n1,a,fact\r\n", "names none of the columns"),
    ("line,question,tema\r\n1,a,x\r\n", "unknown columns ['tema']"),
    ("question,kind\r\na,fact\r\n", "neither a 'line' nor an 'id' column"),
    ("", "the file is empty"),
])
def test_a_bad_header_is_one_message(own_data, tmp_path, header, fragment):
    fields = tmp_path / "campos.csv"
    fields.write_text(header, encoding="utf-8")
    with pytest.raises(data.DatasetError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        data.annotate_file(own_data, fields, tmp_path / "out.jsonl")


def test_bytes_that_are_no_text_encoding_say_how_to_save(own_data, tmp_path):
    fields = tmp_path / "campos.csv"
    fields.write_bytes(b"line,kind\r\n1,\x81\x8d\x8f\r\n")
    with pytest.raises(data.DatasetError, match="CSV UTF-8"):
        data.annotate_file(own_data, fields, tmp_path / "out.jsonl")


# --------------------------------------------------------------------------------------------
# Never writes over its inputs
# --------------------------------------------------------------------------------------------


def test_annotate_refuses_its_input_and_existing_files(own_data, tmp_path):
    fields = tmp_path / "campos.csv"
    fields.write_text(filled_csv(template_rows(own_data, tmp_path)), encoding="utf-8")
    before = own_data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(own_data)
    os.link(own_data, tmp_path / "hard.jsonl")
    for target in (own_data, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", fields):
        with pytest.raises(data.DatasetError, match="never writes over its inputs"):
            data.annotate_file(own_data, fields, target, force=True)
    assert own_data.read_bytes() == before
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep\n", encoding="utf-8")
    with pytest.raises(data.DatasetError, match="--force"):
        data.annotate_file(own_data, fields, existing)
    assert existing.read_text(encoding="utf-8") == "keep\n"
    data.annotate_file(own_data, fields, existing, force=True)
    assert len(data.load_records(existing)) == 5


def test_a_broken_data_file_is_refused_with_its_report(tmp_path):
    fields = tmp_path / "campos.csv"
    fields.write_text("line,kind\r\n1,fact\r\n", encoding="utf-8")
    with pytest.raises(data.DatasetError, match="invalid JSON"):
        data.annotate_file(FIXTURES / "invalid_json.jsonl", fields, tmp_path / "out.jsonl")


# --------------------------------------------------------------------------------------------
# Notebook 01 on data without the fields: the summary and the findings skip what needs them
# --------------------------------------------------------------------------------------------


def test_notebook_01_helpers_skip_what_needs_missing_fields(own_data, embedded_tokenizer):
    records = data.load_records(own_data)
    splits = {"train": records[:3], "validation": records[3:4], "test": records[4:]}
    lengths = data.token_lengths(splits, embedded_tokenizer, "embebido")
    summary = data_report.dataset_summary(splits, lengths)
    assert "Ejemplos" in summary.index and not {"Hecho simple", "Temas"} & set(summary.index)
    assert not summary.isna().any().any() and "nan" not in summary.to_string().lower()
    text = data_report.describe_findings(splits, lengths, data.overlap_checks(splits))
    assert "**Falta `kind`**" in text and "annotate-template" in text and "nan" not in text.lower()
    annotated = [dict(r, kind="fact", topic="t", keywords=["1549"]) for r in records]
    assert data_report.describe_missing({"train": annotated}) == ""
