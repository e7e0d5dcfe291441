"""Notebook 04's speed figures, drawn from the benchmark's saved reports (``results/04_*.json``).

``plot_benchmark``: tokens/s and peak reserved memory side by side, one bar per configuration
(``04_speed_benchmark``); ``plot_correctness``: the per-step loss of both paths and their differences
(``04_fast_path_loss_match``); ``plot_strict``: the run under the strict 8 GB budget (``run --budget strict8``),
tokens/s of each row within it and its GPU memory, part by part, against the 8 GiB card (``04_speed_strict8``).
``plot_clocks``: the GPU's SM clock and power while fp16 and bf16 rows of the fast path take turns
(``04_gpu_clocks_fp16_bf16``, from ``tools/gpu_clocks.sh``'s samples). ``benchmark_caption``, ``correctness_caption``,
``strict_caption`` and ``clocks_caption`` say what each shows, with the device and the date of the measurement, for
``save_figure``.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from utils.numbers import fmt_num, tick_formatter
from utils.paths import scoped_environ
from utils.plotting import COLORS, PALETTE, draw_budget, figure_context, label, legend_outside, new_figure
from utils.plotting import save_figure, set_figure_context
from utils.plotting.labels import LABELS, compose_speed_label
from utils.speed import clocks
from utils.speed.benchmark.configs import CONFIGS_BY_NAME
from utils.speed.benchmark.strict import measured_rounds
from utils.speed.results import load_report, merged_rows
from utils.units import CARD_GIB

FIGURE = "04_speed_benchmark"
CORRECTNESS_FIGURE = "04_fast_path_loss_match"
STRICT_FIGURE = "04_speed_strict8"
CLOCKS_FIGURE = "04_gpu_clocks_fp16_bf16"
DTYPE_COLORS = {"bf16": PALETTE[5], "fp16": PALETTE[1]}
# The parts of a row's GPU memory under the strict budget (its ``budget`` record), stacked in this order
BUDGET_PARTS = (("peak_reserved_gib", "pico reservado por PyTorch", PALETTE[2]),
                ("outside_gib", "fuera del asignador de PyTorch", PALETTE[3]),
                ("cuda_context_gib", "contexto CUDA", PALETTE[7]))
GROUP_COLORS = {"original": COLORS["original"], "recipe": PALETTE[1], "throughput": PALETTE[5],
                "ablation": PALETTE[0], "corpus": PALETTE[3], "peer": PALETTE[7]}
PATH_STYLE = {"original": (COLORS["original"], "-"), "fast": (COLORS["tuned"], "--")}
PATH_NAMES = {"original": "camino original", "fast": "camino rápido"}


def config_label(name: str) -> str:
    """A benchmark configuration's id in words (the label map, else composed from the id's pieces)."""
    if name in LABELS:
        return label(name)
    try:
        return compose_speed_label(name)
    except KeyError:  # an id of an older benchmark the composer does not know
        return label(name)


def _dark(color: str) -> bool:
    """Whether white text reads better than black on ``color`` (its relative luminance under 0,4)."""
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.4


def _group(row: dict) -> str:
    known = CONFIGS_BY_NAME.get(row["name"])  # today's grouping of a known row
    return known.group if known else row.get("group") or "ablation"


def plot_benchmark(report: dict) -> plt.Figure:
    """Tokens/s (left) and peak reserved memory (right) per configuration, the 8 GiB card and the cap drawn."""
    rows = [r for r in merged_rows(report["rows"]) if r.get("tokens_per_second")]  # a CPU test run has no peaks
    fig, (speed, memory) = new_figure(ncols=2, sharey=True, gridspec_kw={"width_ratios": [1.5, 1]})
    fig.set_figheight((0.62 * len(rows) + 3.2) / 2.54)  # about 0,6 cm a bar, 3,2 cm for axes and legend
    y = np.arange(len(rows))
    seen: set[str] = set()
    for i, row in enumerate(rows):
        group = _group(row)
        text = label(f"group:{group}")
        kwargs = dict(height=0.62, color=GROUP_COLORS.get(group, PALETTE[0]), label=None if text in seen else text)
        seen.add(text)
        speed.barh(i, row["tokens_per_second"], **kwargs)
        speed.annotate(fmt_num(row["tokens_per_second"]), (row["tokens_per_second"], i), xytext=(3, 0),
                       textcoords="offset points", va="center", fontsize=8)
        if row.get("peak_reserved_gib") is None:
            continue
        memory.barh(i, row["peak_reserved_gib"], **{**kwargs, "label": None})
        # inside the bar's end: the card's lines sit just past the largest bars
        memory.annotate(fmt_num(row["peak_reserved_gib"], 2), (row["peak_reserved_gib"], i), xytext=(-3, 0),
                        textcoords="offset points", va="center", ha="right", fontsize=8,
                        color="white" if _dark(kwargs["color"]) else "black")
    speed.set_yticks(y, [config_label(r["name"]).replace(", ", ",\n", 1) for r in rows])
    speed.invert_yaxis()
    speed.set_xlabel("tokens reales por segundo")
    speed.set_xlim(0, max([r["tokens_per_second"] for r in rows], default=1) * 1.22)
    memory.set_xlabel("pico reservado (GiB)")
    draw_budget(memory, CARD_GIB, axis="x")
    if report.get("memory_cap_gib"):
        memory.axvline(report["memory_cap_gib"], color=COLORS["budget"], linestyle=":", linewidth=1.0,
                       label=f"límite impuesto al asignador ({fmt_num(report['memory_cap_gib'], 1)} GiB)")
    memory.set_xlim(0, max([CARD_GIB] + [r.get("peak_reserved_gib") or 0 for r in rows]) * 1.2)
    for ax in (speed, memory):
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_formatter(tick_formatter())
    legend_outside(fig, ncol=2)
    return fig


def benchmark_caption(report: dict) -> str:
    """The Spanish caption of ``plot_benchmark``: what is measured, on which device and when."""
    cap = report.get("memory_cap_gib")
    return ("Velocidad y memoria de un paso de entrenamiento QLoRA del gemelo de Llama-3.2-3B (pesos aleatorios, "
            "arquitectura exacta), secuencias de 512 tokens, medido en una "
            f"{report.get('device', 'GPU')} el {report.get('date', '')[:10]}"
            + (f" con solo el asignador de PyTorch limitado a {fmt_num(cap, 1)} GiB (sin contar el contexto CUDA ni "
               "el optimizador paginado: el presupuesto estricto de 8 GB es el de 04_speed_strict8)" if cap else "")
            + ". Cada barra es la mediana de los pasos medidos de una configuración.")


def _strict_rows(report: dict) -> list[dict]:
    """The strict run's rows within the budget (repeats merged), each with its use's outside-allocator part as the
    budget counts it (the larger of the measured and the paged optimizer's states)."""
    fits = set(report["strict"].get("in_budget", []))
    rows = []
    for row in merged_rows(report["rows"]):
        use = row.get("budget") or {}
        if row["name"] in fits and use:
            outside = max(use.get("outside_allocator_gib") or 0.0, use.get("paged_optimizer_gib") or 0.0)
            rows.append({**row, "use": {**use, "outside_gib": outside}})
    return rows


def plot_strict(report: dict) -> plt.Figure:
    """Tokens/s of each row within the strict budget (left; bf16 and fp16 apart, Unsloth hatched) and its GPU memory
    (right): peak reserved + outside the allocator + CUDA context, against the card and the budget's limit."""
    rows = _strict_rows(report)
    if not rows:
        raise ValueError("plot_strict: no row of this strict run is within the budget (report['strict']['in_budget'] "
                         "is empty); strict_table(report) and its 'motivo' column say why.")
    fig, (speed, memory) = new_figure(ncols=2, sharey=True, gridspec_kw={"width_ratios": [1.2, 1]})
    for i, row in enumerate(rows):
        peer = row["impl"] == "unsloth"
        speed.barh(i, row["tokens_per_second"], height=0.62, color=DTYPE_COLORS[row["dtype"]],
                   hatch="//" if peer else None, edgecolor="white" if peer else None)
        speed.annotate(fmt_num(row["tokens_per_second"]), (row["tokens_per_second"], i), xytext=(3, 0),
                       textcoords="offset points", va="center", fontsize=8)
        left = 0.0
        for key, text, color in BUDGET_PARTS:
            memory.barh(i, row["use"][key] or 0.0, left=left, height=0.62, color=color, label=text)
            left += row["use"][key] or 0.0
        # inside the bar's end: the card's lines sit just past the largest bars
        memory.annotate(fmt_num(row["use"]["device_gib"], 2), (left, i), xytext=(-3, 0), textcoords="offset points",
                        va="center", ha="right", fontsize=8)
    # the compute type is the bar's colour: the label leaves it out
    names = [config_label(r["name"]).removesuffix(f", {r['dtype']}") for r in rows]
    labels = [textwrap.fill(n, 36) for n in names]
    speed.set_yticks(np.arange(len(rows)), labels)
    speed.invert_yaxis()
    speed.set_xlabel("tokens reales por segundo")
    speed.set_xlim(0, max(r["tokens_per_second"] for r in rows) * 1.22)
    memory.set_xlabel("memoria de la GPU (GiB)")
    draw_budget(memory, CARD_GIB, axis="x")
    limit = report["budget"]["device_limit_gib"]
    memory.axvline(limit, color=COLORS["budget"], linestyle=":", linewidth=1.0,
                   label=f"límite del presupuesto ({fmt_num(limit, 1)} GiB)")
    memory.set_xlim(0, max([CARD_GIB] + [r["use"]["device_gib"] for r in rows]) * 1.1)
    for ax in (speed, memory):
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_formatter(tick_formatter())
    handles = [Patch(color=DTYPE_COLORS[d], label=d) for d in DTYPE_COLORS if any(r["dtype"] == d for r in rows)]
    if any(r["impl"] == "unsloth" for r in rows):
        handles.append(Patch(facecolor="white", edgecolor=PALETTE[0], hatch="//", label="Unsloth (rayado)"))
    parts, texts = memory.get_legend_handles_labels()
    handles += list(dict(zip(texts, parts)).values())  # each memory part and line once (labelled artists)
    # about 0,75 cm a bar for labels of two lines (0,36 cm a line where the longest has more, so that neighbouring
    # labels do not overlap), 2,6 cm for the axes' labels, 0,5 cm a line of the legend (two entries a line)
    per_bar = max(0.75, 0.36 * max(label.count("\n") + 1 for label in labels))
    fig.set_figheight((per_bar * len(rows) + 2.6 + 0.5 * -(-len(handles) // 2)) / 2.54)
    legend_outside(fig, ncol=2, handles=handles)
    return fig


def strict_caption(report: dict) -> str:
    """The Spanish caption of ``plot_strict``."""
    rules = report["budget"]
    rounds = measured_rounds(report["rows"])
    repeated = f" ({rounds} rondas intercaladas)" if rounds > 1 else ""
    return ("Filas dentro del presupuesto estricto de 8 GB, todas de una sola invocación: velocidad de un paso de "
            "entrenamiento QLoRA del gemelo de Llama-3.2-3B (pesos aleatorios) y su memoria de GPU, medido en una "
            f"{report.get('device', 'GPU')} el {str(report.get('date', ''))[:10]} con las mismas reglas para todas "
            f"las filas: asignador limitado a {fmt_num(rules['card_gib'], 0)} GiB menos el contexto CUDA y "
            f"{fmt_num(rules['display_reserve_gib'], 1)} GiB de la pantalla, el optimizador paginado contado, "
            f"hasta {fmt_num(rules['pinned_limit_gib'], 0)} GiB de memoria fijada en la CPU, dropout de LoRA "
            f"{fmt_num(rules['lora_dropout'], 2)}. Las filas repetidas muestran su mediana{repeated}.")


def plot_correctness(report: dict) -> plt.Figure:
    """Per-step loss of the original and the fast path on the embedded model; their differences below."""
    runs = {r["name"]: r["losses"] for r in report["runs"] if r.get("ok")}
    fig, (top, bottom) = new_figure(nrows=2, aspect=0.38, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    seeds = sorted({n.split("_seed")[1] for n in runs})
    for name, losses in runs.items():
        path, seed = name.split("_seed")
        color, line = PATH_STYLE[path]
        top.plot(range(1, len(losses) + 1), losses, color=color, linestyle=line,
                 alpha=1.0 if seed == seeds[0] else 0.5, label=f"{PATH_NAMES[path]}, semilla {seed}")
    top.set_ylabel("pérdida por paso")
    for seed in seeds:
        a, b = runs.get(f"original_seed{seed}"), runs.get(f"fast_seed{seed}")
        if a and b:
            bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color=COLORS["tuned"],
                        alpha=1.0 if seed == seeds[0] else 0.5, label=f"rápido − original, semilla {seed}")
    if len(seeds) >= 2 and all(f"original_seed{s}" in runs for s in seeds[:2]):
        a, b = runs[f"original_seed{seeds[0]}"], runs[f"original_seed{seeds[1]}"]
        bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color=PALETTE[0], linestyle=":",
                    label=f"original, semilla {seeds[1]} − semilla {seeds[0]} (ruido)")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_xlabel("paso de optimización")
    bottom.set_ylabel("diferencia")
    for ax in (top, bottom):
        ax.yaxis.set_major_formatter(tick_formatter())
        ax.xaxis.set_major_formatter(tick_formatter())
    legend_outside(fig, ncol=2)
    return fig


def correctness_caption(report: dict) -> str:
    """The Spanish caption of ``plot_correctness``."""
    model = label(report.get("model", "embedded"))
    return (f"Pérdida por paso del camino original y del camino rápido con los mismos ejemplos, en el mismo orden "
            f"({model}, {report.get('dtype', '')}, {report.get('device', '')}, {report.get('date', '')[:10]}); "
            "abajo, la diferencia entre ambos caminos frente a la que hay entre dos semillas del original.")


def draw_figures(path: Path) -> list[Path]:
    """Redraw the figure of a benchmark or correctness JSON with ``save_figure`` (a tiny test run: next to it); a
    strict run with rows within its budget gets ``plot_strict`` (its rows out of the budget are in its table)."""
    path = Path(path)
    report = load_report(path)
    beside = "tiny" in report.get("label", "") or report.get("model") not in (None, "embedded")
    with scoped_environ(**({"QLORA_FIGURES_DIR": str(path.parent)} if beside else {})):
        return _draw_report(report, path)


def _draw_report(report: dict, path: Path) -> list[Path]:
    model = report.get("model") or "twin"
    try:
        figure_context()
    except RuntimeError:  # the command line, outside a notebook: the report says what produced it
        set_figure_context(model, os.environ.get("QLORA_PROFILE", "thesis"), report.get("date", "")[:10] or None)
    source = str(Path(path).resolve())  # save_figure names it from the repository's root
    if "runs" in report:
        return [save_figure(plot_correctness(report), CORRECTNESS_FIGURE, caption=correctness_caption(report),
                            source=source, show=False, model=model)]
    if "strict" in report and _strict_rows(report):  # a strict run with rows within its budget (not a CPU test)
        return [save_figure(plot_strict(report), STRICT_FIGURE, caption=strict_caption(report), source=source,
                            show=False, model=model)]
    return [save_figure(plot_benchmark(report), FIGURE, caption=benchmark_caption(report), source=source,
                        show=False, model=model)]


def plot_clocks(samples: list, segments: list, summary: dict, margin_s: float = 1.5) -> plt.Figure:
    """SM clock (top) and power (bottom) of each row's steps, the rows overlaid from their first busy sample (at half
    the power limit or more, ``utils.speed.clocks.summarise``), coloured by dtype, the median clock in the legend;
    the power limit dotted. ``margin_s``: seconds shown before the first and after the last busy sample."""
    fig, (clock, power) = new_figure(nrows=2, aspect=0.36, sharex=True)
    seen: dict[str, int] = {}
    limit = max(s.power_limit_w for s in samples)
    for number, (seg, row) in enumerate(zip(segments, summary["rows"]), start=1):
        inside = clocks.row_samples(samples, seg)
        steps = [s.time for s in clocks.busy(inside, summary["busy_fraction_of_power_limit"])]
        first, last = min(steps), max(steps)
        shown = [s for s in inside if -margin_s <= (s.time - first).total_seconds() <= (last - first).total_seconds()
                 + margin_s]
        x = [(s.time - first).total_seconds() for s in shown]
        seen[row["dtype"]] = seen.get(row["dtype"], 0) + 1
        style = dict(color=DTYPE_COLORS.get(row["dtype"], PALETTE[0]), linewidth=1.2,
                     linestyle="-" if seen[row["dtype"]] == 1 else "--")
        text = f"{row['dtype']}, fila {number}: mediana {fmt_num(row['sm_mhz_median'], 0)} MHz, " \
               f"{fmt_num(row['power_w_median'], 0)} W"
        clock.plot(x, [s.sm_mhz for s in shown], label=text, **style)
        power.plot(x, [s.power_w for s in shown], **style)
    power.axhline(limit, color=COLORS["budget"], linestyle=":", linewidth=1.0,
                  label=f"límite de potencia ({fmt_num(limit, 0)}\u00a0W)")
    clock.set_ylabel("reloj de los SM (MHz)")
    power.set_ylabel("potencia (W)")
    power.set_xlabel("segundos desde la primera muestra en el límite de potencia de cada fila")
    power.set_ylim(0, limit * 1.1)
    for ax in (clock, power):
        ax.yaxis.set_major_formatter(tick_formatter(0))
    legend_outside(fig, "below", ncol=2)
    return fig


def clocks_caption(report: dict) -> str:
    """The Spanish caption of ``plot_clocks``."""
    fp16, bf16 = report["dtypes"]["fp16"], report["dtypes"]["bf16"]
    higher = (bf16["sm_mhz_median"] / fp16["sm_mhz_median"] - 1) * 100
    return (f"Reloj de los SM y potencia de una {report.get('sampled_on') or 'GPU'}, cada 200 ms, durante los pasos "
            "del camino rápido sobre el gemelo de Llama-3.2-3B (micro-lote 32), tres filas una tras otra: fp16, bf16 "
            f"y fp16. Ambos tipos consumen lo mismo, en el límite de potencia (mediana {fmt_num(fp16['power_w_median'], 0)}"
            f" W en fp16, {fmt_num(bf16['power_w_median'], 0)} W en bf16), y el reloj mediano en bf16 es "
            f"{fmt_num(higher, 1)} % más alto que en fp16.")
