"""Thesis tables in LaTeX (utils.latex): escaping, widths, breakable paths, longtable, and a real pdflatex build."""

from __future__ import annotations

import re
import shutil

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

import utils.plotting as plotting

from utils.latex import column_spec, escape_breakable, format_path, latex_escape, write_table
from utils.latex.__main__ import main as latex_main
from utils.latex.__main__ import resolve_folder
from utils.latex.preview import parse_log, render_preview, run_pdflatex, write_preview
from utils.numbers import fmt_num, fmt_pct, fmt_ratio, fmt_unit
from utils.paths import REPO_ROOT, RUNS_DIR

needs_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")

DEGENERATE = "2" + "0" * 299  # a 300-character degenerate generation, one unbreakable word
LONG_PATH = "runs/smoke/04_checkpoints/checkpoint-000040/adapter_model_" + "x" * 70 + ".safetensors"


@pytest.mark.parametrize("raw, escaped", [
    ("50%", r"50\%"), ("a_b", r"a\_b"), ("#1", r"\#1"), ("$5", r"\$5"), ("a & b", r"a \& b"),
    ("{x}", r"\{x\}"), ("a\\b", r"a\textbackslash{}b"), ("x^2", r"x\textasciicircum{}2"),
    ("~185 MB", r"$\sim$185 MB"), ("<x>", r"\textless{}x\textgreater{}"), ('"q"', r"\textquotedbl{}q\textquotedbl{}"),
    ("7,5\u00a0GiB", r"7,5\nobreakspace{}GiB"), ("--profile", r"-{}-profile"), ("año ¿Qué?", "año ¿Qué?"),
    ("5\u00a0×", r"5\nobreakspace{}×"), ("α≈β", r"$\alpha$$\approx$$\beta$"), ("中", r"[U+4E2D]\allowbreak{}"),
    ("a\x07b", "ab"), ("MB = 10⁶ bytes", r"MB = 10\textsuperscript{6} bytes"), ("H₂O", r"H\textsubscript{2}O"),
])
def test_latex_escape(raw, escaped):
    assert latex_escape(raw) == escaped


def test_escape_never_leaves_a_bare_special_character():
    text = latex_escape(r"\ { } $ & # _ % ^ ~ < > | ` " + '"')
    stripped = re.sub(r"\\[a-zA-Z]+(\{\})?|\\[{}$&#_%,]|\$\\sim\$", "", text)
    assert not set(stripped) & set("\\{}$&#_%^~<>|`\""), stripped


def test_long_words_get_break_points_and_short_ones_do_not():
    assert escape_breakable("reglamento de grado", 10) == "reglamento de grado"
    broken = escape_breakable(DEGENERATE, 20)
    pieces = broken.split(r"\allowbreak{}")
    assert "".join(pieces) == DEGENERATE and max(map(len, pieces)) <= 10
    assert r"\-" in escape_breakable("a" * 80, 20)  # letters only: discretionary hyphens


def test_numbers_never_break_and_paths_in_prose_break_after_separators():
    assert escape_breakable("3.213.004.800 y 1,491", 4) == "3.213.004.800 y 1,491"  # a break would misread it
    assert r"\allowbreak" in escape_breakable("2" * 30, 4)  # digits without grouping: a degenerate answer
    prose = escape_breakable("medido en results/02_twin_gpu_memory.json hoy", 70)
    assert r"results/\allowbreak{}02\_\allowbreak{}twin" in prose and prose.endswith(" hoy")


def test_column_spec_takes_the_padding_off_each_column():
    spec = column_spec(0.25)
    assert r"p{\dimexpr 0.2500\linewidth-2\tabcolsep\relax}" in spec and r"\raggedright\arraybackslash" in spec
    assert r"\raggedleft" in column_spec(0.1, "right")


def _sample() -> pd.DataFrame:
    return pd.DataFrame({
        "afirmación": ["parámetros entrenables", "% entrenable ~ 2 #", "respuesta degenerada"],
        "medido": [fmt_num(48627712), fmt_pct(0.01491, 3), DEGENERATE],
        "archivo": ["results/02_twin_gpu_memory.json", LONG_PATH, "dataset/utn_sample_test.jsonl"],
    })


def test_write_table_float_layout(tmp_path):
    path = write_table(_sample(), "03_claims", caption="Afirmaciones ~ medidas.", widths=[0.3, 0.3, 0.4],
                       path_columns=["archivo"], notes="Nota: 50 % de algo.", directory=tmp_path)
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "03_claims.tex"
    for needed in (r"\begin{table}[htbp]", r"\centering", r"\small", r"\toprule", r"\midrule", r"\bottomrule",
                   r"\label{tab:03_claims}", r"\caption{Afirmaciones $\sim$ medidas.}", "48.627.712",
                   r"1,491\nobreakspace{}\%", r"\path{results/02_twin_gpu_memory.json}", r"Nota: 50 \% de algo."):
        assert needed in text, needed
    fractions = [float(f) for f in re.findall(r"\\dimexpr ([\d.]+)\\linewidth", text)]
    assert fractions == [0.3, 0.3, 0.4]
    assert "longtable" not in text.split("\n", 2)[2] and "\t" not in text


def test_write_table_longtable(tmp_path):
    table = pd.concat([_sample()] * 20, ignore_index=True)
    text = write_table(table, "05_respuestas", caption="Respuestas.", widths=[0.2, 0.4, 0.4], long=True,
                       directory=tmp_path).read_text(encoding="utf-8")
    assert text.count(r"\begin{longtable}") == 1 and r"\endhead" in text and r"\endlastfoot" in text
    assert "Continúa en la página siguiente" in text and r"\begin{table}" not in text
    assert text.count(r"\\" + "\n") >= 60


def test_write_table_defaults_to_the_profile_figures_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(tmp_path / "figs"))
    path = write_table(_sample(), "01_resumen", caption="x", widths=[0.3, 0.3, 0.4])
    assert path == tmp_path / "figs" / "01_resumen.tex" and path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_paths_break_and_fall_back_when_path_cannot_type_them():
    assert format_path("dataset/x.jsonl", 20) == r"\path{dataset/x.jsonl}"
    assert format_path("a{b}/c", 20) == r"\path|a{b}/c|"
    fallback = format_path("C:/Users/Ana Pérez/tesis/año.jsonl", 20)
    assert fallback.startswith(r"\texttt{") and "Pérez" in fallback and r"\allowbreak{}" in fallback
    assert r"\allowbreak{}" in format_path(LONG_PATH, 20) and r"\path" not in format_path(LONG_PATH, 20)


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": [0.5, 0.5, 0.2]}, "add up to 1.200"),
    ({"widths": [0.5, 0.5]}, "2 widths for 3 columns"),
    ({"widths": [0.5, 0.5, 0.0]}, "positive"),
    ({"widths": [0.3, 0.3, 0.4], "path_columns": ["ruta"]}, "no column 'ruta'"),
])
def test_write_table_refuses_bad_layouts(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        write_table(_sample(), "03_claims", caption="x", directory=tmp_path, **kwargs)


def test_write_table_refuses_unformatted_numbers_and_bad_names(tmp_path):
    with pytest.raises(TypeError, match="utils.numbers"):
        write_table(pd.DataFrame({"x": [0.5]}), "01_t", caption="x", widths=[1], directory=tmp_path)
    with pytest.raises(ValueError, match="file stem"):
        write_table(_sample(), "../03 claims", caption="x", widths=[0.3, 0.3, 0.4], directory=tmp_path)
    missing = write_table(pd.DataFrame({"x": [None, 3]}, dtype=object), "01_t", caption="x", widths=[1],
                          directory=tmp_path).read_text(encoding="utf-8")
    assert "\n— \\\\\n" in missing and "\n3 \\\\\n" in missing  # a missing value prints as a dash


def test_preview_folder_is_the_profile_figures_folder_or_dir(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("QLORA_FIGURES_DIR", raising=False)
    monkeypatch.setenv("QLORA_PROFILE", "thesis")
    assert resolve_folder("demo", None) == RUNS_DIR / "demo" / "figures"
    assert resolve_folder("demo", "figures/demo") == REPO_ROOT / "figures" / "demo"
    assert latex_main(["preview", "--dir", str(tmp_path / "no_such_folder")]) == 1
    assert "run the notebooks" in capsys.readouterr().err


def test_parse_log_counts_boxes_and_errors():
    log = "\n".join([
        "(./preview.tex (/usr/share/texlive/texmf-dist/tex/latex/booktabs/booktabs.sty)",
        "(./03_claims.tex",
        r"Overfull \hbox (62.3pt too wide) in paragraph at lines 10--12",
        r"[]\T1/lmr/m/n/10.95 tabla (sin cerrar",  # the box's contents: their parentheses are not files
        "",
        r"Overfull \hbox (0.4pt too wide) in alignment at lines 3--9",
        "",
        ") (./05_respuestas.tex",
        r"Overfull \vbox (3.0pt too high) has occurred while \output is active",
        "",
        r"Underfull \hbox (badness 10000) in paragraph at lines 4--4",
        "",
        "./05_respuestas.tex:7: Undefined control sequence.",
        "! Emergency stop.",
        "Missing character: There is no ^^e4 in font cmr10!",
    ])
    summary = parse_log(log)
    assert [s for s, _ in summary.overfull] == [62.3, 0.4, 3.0] and len(summary.underfull) == 1
    assert [w.split(":")[0] for _, w in summary.overfull] == ["03_claims.tex", "03_claims.tex", "05_respuestas.tex"]
    problems = summary.problems()
    assert sum(p.startswith("overfull") for p in problems) == 2 and len(summary.errors) == 2
    assert any("missing character" in p for p in problems)
    assert "largest 62.30 pt" in summary.describe()


def _draw_figures(folder, monkeypatch) -> None:
    """Two figures (full and half width) saved by utils.plotting.save_figure, which writes figuras.tex."""
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(folder))
    monkeypatch.setattr(plotting, "_CONTEXT", {})  # set_figure_context's state stays inside this test
    with matplotlib.rc_context():
        plotting.set_figure_context("embedded", "smoke", "2026-12-02")
        for name, width in (("04_loss_curve", "full"), ("04_grad_norm", "half")):
            fig, ax = plotting.new_figure(width)
            ax.plot([0, 1, 2], [2.5, 1.2, 0.9], label="entrenamiento")
            ax.set_xlabel("paso")
            ax.set_ylabel("pérdida")
            plotting.save_figure(fig, name, caption="Pérdida por paso (~50 % del total; ruta_con_guiones).",
                                 source=["runs/smoke/04_log_history.csv", "dataset/utn_sample_train.jsonl"],
                                 show=False)


def _tricky_tables(folder) -> None:
    answers = pd.DataFrame({
        "Pregunta": ["\n¿Qué régimen rige la Ord. 1549?\n\n ñandú, pingüino\n",
                     "50 % ~ # _ & $ { } \\ ^ < > \" |"],
        "Respuesta": [DEGENERATE, "Según el art. 1.4 -- plazo de 30 días; ≈ 7,5 GiB ≥ 2 → 10¹² 10⁶ 10⁻³ 中 "
                      "развитиразвити.calendar"],  # a random model's run of untypeset letters: 16 codes, no space
        "Archivo": [LONG_PATH, "C:\\Users\\Ana Pérez\\tesis\\datos_año.jsonl"],
    })
    write_table(answers, "05_respuestas", caption="Respuestas ~ elegidas (ejemplo con % y _).",
                widths=[0.25, 0.45, 0.3], long=True, path_columns=["Archivo"], directory=folder,
                notes=f"Nota: la tabla completa está en {LONG_PATH}.")
    numbers = pd.DataFrame({"medida": ["memoria", "velocidad", "entrenable"],
                            "valor": [fmt_unit(7.5, "GiB", 1), fmt_ratio(28.5), fmt_pct(0.01491, 3)],
                            "parámetros": [fmt_num(3_213_004_800), fmt_num(48_627_712), fmt_num(0)]})
    write_table(numbers, "03_claims", caption="Números es-AR.", widths=[0.4, 0.3, 0.3],
                align_right=["valor", "parámetros"], directory=folder)


@needs_pdflatex
def test_preview_compiles_without_errors_or_overfull_boxes(tmp_path, capsys, monkeypatch):
    _draw_figures(tmp_path, monkeypatch)
    _tricky_tables(tmp_path)
    preview = render_preview(tmp_path)
    assert r"\input{figuras.tex}" in preview and preview.index("03_claims") < preview.index("05_respuestas")
    assert (tmp_path / "figuras.tex").read_text(encoding="utf-8").count(r"\begin{figure}") == 2
    assert latex_main(["build", "--dir", str(tmp_path)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "pdfTeX" in out and "errors: 0;" in out and (tmp_path / "preview.pdf").stat().st_size > 10_000
    assert not (tmp_path / "preview.aux").exists()


@needs_pdflatex
def test_build_fails_on_a_table_wider_than_the_text_and_on_an_error(tmp_path):
    (tmp_path / "01_ancha.tex").write_text("\\begin{tabular}{p{20cm}}\nx \\\\\n\\end{tabular}\n", encoding="utf-8")
    write_preview(tmp_path)
    summary = run_pdflatex(tmp_path)
    assert summary.overfull and summary.overfull[0][0] > 100 and summary.problems()
    (tmp_path / "01_ancha.tex").write_text("\\undefinedmacro\n", encoding="utf-8")
    assert latex_main(["build", "--dir", str(tmp_path)]) == 1
    assert any("Undefined control sequence" in e for e in run_pdflatex(tmp_path).errors)
