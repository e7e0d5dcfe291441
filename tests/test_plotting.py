"""The print standard: figures at print size with fonts ≥ 8 pt, es-AR ticks, legends outside the data, provenance
in the PDF and in ``figuras.tex``, and one Spanish label for every id the corpus and the code use."""

from __future__ import annotations

import json
from io import BytesIO
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from utils import plotting  # noqa: E402
from utils.memory.analytic import FORMATS, TENSOR_KINDS, TRAIN_VARIANTS  # noqa: E402
from utils.lora import SEARCH_MODULE_SETS  # noqa: E402
from utils.memory.gpu_report import GPU_TRAIN_CONFIGS  # noqa: E402
from utils.paths import DATASET_DIR, PARAMS_DIR  # noqa: E402
from utils.plotting import labels  # noqa: E402
from utils.speed.benchmark.configs import CONFIGS  # noqa: E402

CM = 2.54


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(tmp_path))
    plotting.set_figure_context("embedded", "smoke", "2026-12-02")
    yield tmp_path
    plt.close("all")


def _pdf_info(path) -> str:
    """The PDF's Info dictionary, decoded (matplotlib writes non-ASCII strings as UTF-16 with a BOM)."""
    raw = path.read_bytes()
    info = raw[raw.index(b"/Title"):]
    info = info[: info.index(b">>")]
    parts = re.findall(rb"/(\w+) \((.*?)\)\n", info, re.S)

    def decode(value: bytes) -> str:
        value = value.replace(b"\\", b"")
        return value[2:].decode("utf-16-be") if value.startswith(b"\xfe\xff") else value.decode("latin-1")

    return "\n".join(f"{k.decode()}={decode(v)}" for k, v in parts)


def _simple_figure(width: str = "full"):
    fig, ax = plotting.new_figure(width)
    ax.plot([0, 1, 2], [0.5, 1.25, 2500.0], label="serie")
    ax.set_xlabel("paso")
    ax.set_ylabel("memoria (GiB)")
    plotting.legend_outside(ax)
    return fig, ax


def test_presets_are_the_thesis_widths():
    assert plotting.WIDTH_FULL_IN * CM == pytest.approx(16.0)
    assert plotting.WIDTH_HALF_IN * CM == pytest.approx(7.5)
    fig, _ = plotting.new_figure()
    assert fig.get_figwidth() * CM == pytest.approx(16.0)
    fig, _ = plotting.new_figure("half")
    assert fig.get_figwidth() * CM == pytest.approx(7.5)
    with pytest.raises(ValueError, match="full"):
        plotting.new_figure("wide")


def test_palette_is_okabe_ito_and_colors_keep_their_keys():
    assert [c.upper() for c in plotting.PALETTE] == ["#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442",
                                                     "#0072B2", "#D55E00", "#CC79A7"]
    assert {"base", "tuned", "original", "fixed", "train", "eval", "budget"} <= set(plotting.COLORS)
    assert set(plotting.COLORS.values()) <= set(plotting.PALETTE)
    # vermillion is the palette's red: never against its bluish green in one pair
    assert {plotting.COLORS["original"], plotting.COLORS["fixed"]} != {"#D55E00", "#009E73"}


def test_saved_figure_is_print_size_with_fonts_of_8_pt_or_more(figures):
    fig, _ = _simple_figure()
    texts = []
    real_check = plotting.check_print_standard

    def spy(figure, name):
        texts.extend(t for t in figure.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip())
        return real_check(figure, name)

    plotting.check_print_standard = spy
    try:
        pdf = plotting.save_figure(fig, "99_prueba", caption="Una prueba.", source="dataset/utn_sample_train.jsonl",
                                   show=False)
    finally:
        plotting.check_print_standard = real_check
    assert pdf.exists() and pdf.with_suffix(".png").exists()
    assert texts and min(t.get_fontsize() for t in texts) >= plotting.MIN_FONT_PT
    # The PDF's page is the figure's size: 16 cm wide (453,5 pt), so the fonts print at the size drawn
    box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)", pdf.read_bytes())
    assert float(box.group(1)) / 72 * CM == pytest.approx(16.0, abs=0.01)
    entry = json.loads((figures / "figuras.json").read_text())["99_prueba"]
    assert entry["width_cm"] == pytest.approx(16.0) and entry["min_font_pt"] >= 8


def test_small_text_wide_figure_and_legend_on_data_are_refused(figures):
    fig, ax = _simple_figure()
    ax.annotate("nota diminuta", (1, 1), fontsize=6)
    with pytest.raises(ValueError, match=r"99_chica.*'nota diminuta'.*6 pt"):
        plotting.save_figure(fig, "99_chica", caption="x.", source="a.json", show=False)
    fig, ax = plt.subplots(figsize=(10, 4))
    with pytest.raises(ValueError, match=r"99_ancha.*25,4 cm"):
        plotting.save_figure(fig, "99_ancha", caption="x.", source="a.json", show=False)
    fig, ax = plotting.new_figure()
    ax.plot([0, 1], [0, 1], label="serie")
    ax.legend(loc="upper left")
    with pytest.raises(ValueError, match=r"99_leyenda.*leyenda"):
        plotting.save_figure(fig, "99_leyenda", caption="x.", source="a.json", show=False)
    assert not list(figures.glob("*.pdf"))


def test_old_call_without_caption_is_a_clear_type_error(figures):
    fig, _ = _simple_figure()
    with pytest.raises(TypeError, match="caption="):
        plotting.save_figure(fig, "99_vieja")


def test_no_context_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr(plotting, "_CONTEXT", {})
    fig, _ = _simple_figure()
    with pytest.raises(RuntimeError, match="set_figure_context"):
        plotting.save_figure(fig, "99_sin", caption="x.", source="a.json", show=False)


def test_legend_outside_sits_off_every_axes(figures):
    fig, (a, b) = plotting.new_figure(ncols=2)
    a.plot([0, 1], [0, 1], label="uno")
    b.plot([0, 1], [1, 0], label="dos")
    legend = plotting.legend_outside(fig)
    fig.canvas.draw()
    box = legend.get_window_extent(fig.canvas.get_renderer())
    assert not a.bbox.overlaps(box) and not b.bbox.overlaps(box)
    assert [t.get_text() for t in legend.get_texts()] == ["uno", "dos"]
    assert fig.bbox.padded(1).contains(box.x0, box.y0) and fig.bbox.padded(1).contains(box.x1, box.y1)


def test_ticks_and_log_ticks_are_es_ar(figures):
    fig, (a, b) = plt.subplots(1, 2, figsize=(plotting.WIDTH_FULL_IN, 3))
    a.plot([0, 0.5, 2500], [0.25, 0.5, 0.75])
    b.plot([1, 10, 10000], [1, 10, 10000])
    b.set_xscale("log")
    plotting.localize_ticks(fig)
    fig.canvas.draw()
    shown = [t.get_text() for ax in (a, b) for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert "2.000" in shown and "0,50" in shown or "0,5" in shown
    assert "10.000" in shown
    assert not [s for s in shown if re.fullmatch(r"-?\d+\.\d{1,2}", s)]  # no English decimal point
    assert not [s for s in shown if "$" in s or "10^" in s]


def test_metadata_and_figuras_tex(figures):
    fig, _ = _simple_figure()
    plotting.save_figure(fig, "99_b", caption="Memoria por formato (~ 2 × 3 %).",
                         source=["dataset/utn_sample_train.jsonl", "results/02_twin_gpu_memory.json"], show=False)
    fig, _ = _simple_figure("half")
    pdf = plotting.save_figure(fig, "99_a", caption="Media figura.", source="results/x.json", show=False)
    info = _pdf_info(pdf)
    assert "Title=Media figura." in info
    assert "SmolLM2-135M-Instruct (embebido)" in info and "prueba rápida" in info and "2026-12-02" in info
    assert "results/x.json" in info
    assert b"CreationDate" not in pdf.read_bytes()
    tex = (figures / "figuras.tex").read_text()
    assert tex.count(r"\begin{figure}") == 2 and tex.index("99_a") < tex.index("99_b")
    assert r"\includegraphics[width=0.5\linewidth]{\figurasdir/99_a.pdf}" in tex
    assert r"\includegraphics[width=\linewidth]{\figurasdir/99_b.pdf}" in tex
    assert r"\label{fig:99_b}" in tex
    assert (r"Memoria por formato ($\sim$ 2 × 3 \%). Modelo: SmolLM2-135M-Instruct (embebido); perfil: "
            r"prueba rápida; datos: \path{dataset/utn_sample_train.jsonl}, \path{results/02_twin_gpu_memory.json}; "
            r"fecha: 2026-12-02.") in tex
    # same data, same bytes: saving again changes nothing
    before = {p.name: p.read_bytes() for p in figures.iterdir()}
    fig, _ = _simple_figure("half")
    plotting.save_figure(fig, "99_a", caption="Media figura.", source="results/x.json", show=False)
    assert before == {p.name: p.read_bytes() for p in figures.iterdir()}


def _corpus_values(field: str) -> set[str]:
    found = set()
    for path in DATASET_DIR.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                value = json.loads(line).get(field)
                found.update([value] if isinstance(value, str) else [])
    source = yaml.safe_load((DATASET_DIR / "sources" / "utn_qa.yaml").read_text(encoding="utf-8"))
    for items in source.values():
        for item in items if isinstance(items, list) else []:
            if field in item:
                found.add(item[field])
    return found


def test_label_map_covers_every_id_of_the_corpus_and_the_code():
    profiles = {p.stem for p in PARAMS_DIR.glob("*.yaml")}
    models = {yaml.safe_load(p.read_text())["common"]["model_name"] for p in PARAMS_DIR.glob("*.yaml")}
    ids = (_corpus_values("topic") | _corpus_values("kind") | set(FORMATS) | set(TRAIN_VARIANTS)
           | {c[0] for c in GPU_TRAIN_CONFIGS} | {c.name for c in CONFIGS} | profiles | models
           | {"train", "validation", "test", "base", "tuned"})
    ids |= {f"tensor:{k}" for k in TENSOR_KINDS} | {f"modules:{k}" for k in SEARCH_MODULE_SETS}
    assert _corpus_values("topic") and _corpus_values("kind")
    assert sorted(ids - set(labels.LABELS)) == []
    for key in ids:  # a human name: no snake_case id left in it
        assert not re.search(r"[a-z]_[a-z]", plotting.label(key).replace("down_proj", "").replace("lm_head", "")), key


def test_label_names_the_spec_examples_and_humanises_unknown_keys():
    assert plotting.label("no_prepare_gc") == "sin prepare, con checkpointing"
    assert plotting.label("embedded") == "SmolLM2-135M-Instruct (embebido)"
    assert plotting.label("reglamento_grado") == "Reglamento de grado"
    assert [plotting.label(s) for s in ("train", "validation", "test")] == ["entrenamiento", "validación", "prueba"]
    assert plotting.label("becas_estudiantiles") == "Becas estudiantiles"
    assert plotting.label("fast_mb32_dropout0_bf16") == "camino rápido, micro-lote 32, sin dropout, bf16"


def test_pdf_stream_is_vector():
    """The PDF is vector text (TrueType, selectable), not an embedded bitmap."""
    fig, _ = _simple_figure()
    buf = BytesIO()
    fig.savefig(buf, format="pdf")
    data = buf.getvalue()
    assert b"/FontFile2" in data and b"/Subtype /Image" not in data


def _chapter_figures() -> dict:
    """Each figure of notebooks 02, 03 and 04's speed section, drawn from committed results or tiny tables."""
    import pandas as pd

    from utils.memory import load_gpu_report, training_table, weights_table
    from utils.modeling import twin_config
    from utils.paths import RESULTS_DIR
    from utils.plotting import lora as lora_plots
    from utils.plotting import memory as memory_plots
    from utils.plotting import speed as speed_plots
    from utils.speed.results import load_report

    gpu = load_gpu_report(RESULTS_DIR / "02_twin_gpu_memory.json")
    errors = pd.DataFrame([{"capa": layer, "formato": fmt, "tipo": "attention", "error_relativo": err}
                           for layer in range(3) for fmt, err in (("nf4", 0.09), ("fp4", 0.12), ("nf4_dq", 0.091))])
    sweep = pd.DataFrame([{"modelo": "Llama-3.2-3B (gemelo)", "módulos": key, "r": r,
                           "entrenables (PEFT)": r * 1e5 * k, "MB analítico (fp32)": r * 0.4 * k,
                           "MB guardado": r * 0.4 * k if r == 32 else None}
                          for k, key in enumerate(("attention", "mlp", "all"), 1) for r in (8, 32)])
    return {
        "02_twin_memory_by_format": lambda: memory_plots.plot_memory_by_format(
            weights_table(gpu["weights"], twin_config()), training_table(gpu["train"]), 8.0),
        "02_quantization_error": lambda: memory_plots.plot_quantization_error(errors),
        "03_lora_diagram": lora_plots.plot_lora_diagram,
        "03_lora_sweep": lambda: lora_plots.plot_sweep(sweep),
        "04_speed_benchmark": lambda: speed_plots.plot_benchmark(load_report(RESULTS_DIR / "04_speed_benchmark.json")),
        "04_fast_path_loss_match": lambda: speed_plots.plot_correctness(
            load_report(RESULTS_DIR / "04_fast_path_correctness.json")),
        "04_speed_strict8": lambda: speed_plots.plot_strict(load_report(RESULTS_DIR / "04_speed_strict8.json")),
        "04_gpu_clocks_fp16_bf16": _clocks_figure,
    }


def _clocks_figure():
    from utils.files import read_json
    from utils.paths import RESULTS_DIR
    from utils.plotting import speed as speed_plots
    from utils.speed import clocks

    report = read_json(RESULTS_DIR / "04_gpu_clocks_h200.json")
    return speed_plots.plot_clocks(clocks.read_samples(RESULTS_DIR / report["smi_file"]),
                                   clocks.read_segments(RESULTS_DIR / report["marks_file"]), report)


@pytest.mark.parametrize("name", list(_chapter_figures()))
def test_chapter_figures_meet_the_print_standard(name, figures):
    """Notebooks 02/03 and the speed figures: 16 cm wide, no text under 8 pt, nothing cut, legends off the data."""
    fig = _chapter_figures()[name]()
    plotting.localize_ticks(fig)
    smallest = plotting.check_print_standard(fig, name)
    assert fig.get_figwidth() * CM == pytest.approx(16.0) and smallest >= 8
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_visible()]
    assert not [t for t in texts if re.search(r"[a-z]_[a-z]", t) and "_proj" not in t]  # no internal ids
    assert not [t for t in texts if re.fullmatch(r"-?\d+\.\d{1,2}", t.strip())]  # no English decimals
    assert not any("Objetivo" in t for t in texts)  # no project goal drawn
    assert fig.get_figheight() * CM <= 22  # fits a page with its caption


def test_ticks_of_a_secondary_axis_outside_its_range_are_not_clipped_text():
    """The demo's loss curve: an epoch axis on top whose next tick (0,4) lies past the last step is not drawn."""
    fig, ax = plotting.new_figure(aspect=0.5)
    ax.plot([0, 80], [3.0, 1.2])
    ax.set_xlim(0, 80)
    ax.secondary_xaxis("top", functions=(lambda s: s * 0.0049, lambda e: e / 0.0049))
    assert plotting.check_print_standard(fig, "secundario") >= 8
