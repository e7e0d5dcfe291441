"""The bibliography (figures/referencias.bib): complete entries, the agreed keys, and every key a notebook cites."""

from __future__ import annotations

import re
import shutil
import subprocess

import nbformat
import pytest

from utils.paths import FIGURES_DIR, NOTEBOOKS_DIR

BIB = FIGURES_DIR / "referencias.bib"
# The keys the notebooks agreed to cite (session spec): each must exist, spelt exactly so.
AGREED_KEYS = {
    "hu2021lora", "dettmers2023qlora", "lin2004rouge", "popovic2015chrf", "popovic2017chrfpp",
    "efron1979bootstrap", "efron1993bootstrap", "vonwerra2020trl", "mangrulkar2022peft", "dettmers2022bitsandbytes",
    "wolf2020transformers", "robertson2009bm25", "cohen1960kappa", "lhoest2021datasets", "dettmers2022optimizers",
    "touvron2023llama", "grattafiori2024llama3", "allal2025smollm2", "dao2022flashattention", "chen2016checkpointing",
    "loshchilov2019adamw", "hsu2024liger",
}
REFERENCES_HEADING = re.compile(r"^##\s+Referencias\s*$", re.MULTILINE)
CITED_KEY = re.compile(r"^\s*[-*]\s*\[([^\]\s]+)\]", re.MULTILINE)


def parse_bib(text: str) -> dict[str, dict[str, str]]:
    """``{key: {field: value}}`` of a BibTeX file (braced values, nested braces allowed; comments skipped)."""
    entries: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", text, re.MULTILINE):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        body = text[match.end():i - 1]
        fields, pos = {"ENTRYTYPE": match[1].lower()}, 0
        for field in re.finditer(r"(\w+)\s*=\s*\{", body):
            if field.start() < pos:
                continue
            depth, j = 1, field.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(body[j], 0)
                j += 1
            fields[field[1].lower()] = " ".join(body[field.end():j - 1].split())
            pos = j
        assert match[2] not in entries, f"{BIB.name}: key {match[2]} appears twice"
        entries[match[2]] = fields
    return entries


@pytest.fixture(scope="module")
def bib() -> dict[str, dict[str, str]]:
    return parse_bib(BIB.read_text(encoding="utf-8"))


def cited_keys() -> dict[str, list[str]]:
    """``{notebook name: [keys]}`` for every notebook with a "## Referencias" markdown cell."""
    found = {}
    for path in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown" and REFERENCES_HEADING.search(cell.source):
                found[path.name] = CITED_KEY.findall(REFERENCES_HEADING.split(cell.source, 1)[1])
    return found


def test_parse_bib_reads_nested_braces():
    entries = parse_bib("@misc{k1,\n  title = {{LoRA}: a {B} c},\n  year = {2021}\n}\n@book{k2, author = {A}}\n")
    assert entries == {"k1": {"ENTRYTYPE": "misc", "title": "{LoRA}: a {B} c", "year": "2021"},
                       "k2": {"ENTRYTYPE": "book", "author": "A"}}


def test_no_stray_at_sign_outside_entries():
    # BibTeX has no comment syntax: an "@" anywhere (even after "%") starts an entry.
    stray = [n for n, line in enumerate(BIB.read_text(encoding="utf-8").splitlines(), 1)
             if "@" in line and not line.startswith("@")]
    assert not stray, f"{BIB.name}: '@' outside an entry start on lines {stray}"


def test_bib_has_every_agreed_key(bib):
    assert not AGREED_KEYS - set(bib), f"missing in {BIB.name}: {sorted(AGREED_KEYS - set(bib))}"


def test_every_entry_is_complete(bib):
    for key, fields in bib.items():
        missing = [f for f in ("author", "title", "year") if not fields.get(f)]
        assert not missing, f"{BIB.name}: {key} lacks {', '.join(missing)}"
        assert re.fullmatch(r"(19|20)\d\d", fields["year"]), f"{key}: year {fields['year']!r}"
        assert fields["year"] in key, f"{key}: the key's year differs from year = {fields['year']}"
        assert fields.get("url") or fields.get("doi") or fields.get("howpublished"), f"{key}: no url or doi"
        if fields["ENTRYTYPE"] == "misc":
            assert fields.get("version"), f"{key}: a software entry names the version used"


def test_notebook_references_exist_in_the_bib(bib):
    for notebook, keys in cited_keys().items():
        assert keys, f"{notebook}: its '## Referencias' cell lists no '- [key] …' line"
        unknown = sorted(set(keys) - set(bib))
        assert not unknown, f"{notebook}: cites {unknown}, not in {BIB.relative_to(BIB.parents[1])}"


@pytest.mark.skipif(not (shutil.which("pdflatex") and shutil.which("bibtex")), reason="pdflatex/bibtex absent")
def test_bib_compiles_with_bibtex(tmp_path, bib):
    shutil.copy(BIB, tmp_path / "referencias.bib")
    (tmp_path / "citas.tex").write_text(
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage[spanish]{babel}\n\\usepackage{url}\n"
        f"\\begin{{document}}\n\\nocite{{{','.join(sorted(bib))}}}\n"
        "\\bibliographystyle{plain}\n\\bibliography{referencias}\n\\end{document}\n", encoding="utf-8")
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120}
    latex = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "citas.tex"]
    assert subprocess.run(latex, **run).returncode == 0
    bibtex = subprocess.run(["bibtex", "citas"], **run)
    blg = (tmp_path / "citas.blg").read_text(encoding="utf-8", errors="replace")
    assert bibtex.returncode == 0 and "error message" not in blg, blg
    warnings = [line for line in blg.splitlines() if line.startswith("Warning--")]
    assert not warnings, "\n".join(warnings)
    for _ in range(2):
        assert subprocess.run(latex, **run).returncode == 0
    bbl = (tmp_path / "citas.bbl").read_text(encoding="utf-8")
    assert bbl.count("\\bibitem") == len(bib)
