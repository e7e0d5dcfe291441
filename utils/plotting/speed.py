"""Notebook 04's speed figures, drawn from the benchmark's saved reports (``results/04_*.json``).

``plot_benchmark``: tokens/s against peak reserved memory, one point per configuration (``04_speed_benchmark``);
``plot_correctness``: the per-step loss of both paths and their differences (``04_fast_path_loss_match``).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

from utils.plotting import save_figure, set_style
from utils.speed.benchmark.configs import CONFIGS_BY_NAME
from utils.speed.results import load_report, merged_rows
from utils.units import BUDGET_GIB, CARD_GIB

FIGURE = "04_speed_benchmark"
CORRECTNESS_FIGURE = "04_fast_path_loss_match"

GROUP_STYLE = {
    "original": ("#d62728", "o", "Configuración original"),
    "recipe": ("#ff7f0e", "s", "Receta original (2 secuencias/paso), acelerada"),
    "throughput": ("#2ca02c", "D", "Camino rápido, micro-lote grande"),
    "ablation": ("#7f7f7f", "v", "Ablaciones"),
    "corpus": ("#1f77b4", "^", "Ejemplos reales del corpus"),
    "peer": ("#9467bd", "P", "Unsloth (referencia)"),
}


def plot_benchmark(report: dict) -> plt.Figure:
    """Tokens/s against peak reserved memory, one numbered point per configuration, the 8 GiB line drawn."""
    rows = [r for r in merged_rows(report["rows"]) if r.get("peak_reserved_gib") is not None]
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11.5, 5.4), gridspec_kw={"width_ratios": [2.1, 1]})
    seen, lines = set(), []
    for n, row in enumerate(rows, 1):
        known = CONFIGS_BY_NAME.get(row["name"])  # today's grouping of a known row
        group = known.group if known else row.get("group") or "ablation"
        color, marker, label = GROUP_STYLE.get(group, GROUP_STYLE["ablation"])
        filled = row["dtype"] == "bf16"
        ax.scatter(row["peak_reserved_gib"], row["tokens_per_second"], s=48, marker=marker,
                   facecolors=color if filled else "white", edgecolors=color, linewidths=1.4,
                   label=label if label not in seen else None, zorder=3)
        seen.add(label)
        ax.annotate(str(n), (row["peak_reserved_gib"], row["tokens_per_second"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points", color="#222222")
        lines.append(f"{n:>2}  {row['name']}  {row['tokens_per_second']:,.0f} tok/s")
    ax.axvline(CARD_GIB, color="#d62728", linestyle="--", linewidth=1.2, label="RTX 2070 SUPER (8 GiB)")
    ax.axvline(BUDGET_GIB, color="#d62728", linestyle=":", linewidth=1.0, label="Presupuesto útil (7,5 GiB)")
    original = next((r for r in rows if r["name"] == "original_fp16"), None)
    if original:
        goal = 28 * original["tokens_per_second"]
        ax.axhline(goal, color="#555555", linestyle="-.", linewidth=0.9, label="Objetivo: 28 × original (fp16)")
    ax.set_yscale("log")
    ax.set_xlabel("Memoria reservada máxima (GiB)")
    ax.set_ylabel("Tokens reales por segundo (escala log.)")
    ax.set_title(f"Velocidad de entrenamiento QLoRA, gemelo de Llama-3.2-3B\n{report.get('device', '')}, "
                 f"{report.get('date', '')[:10]} (relleno: bf16; vacío: fp16)"
                 + (f"; asignador limitado a {report['memory_cap_gib']:g} GiB".replace(".", ",")
                    if report.get("memory_cap_gib") else ""),
                 fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")
    key.axis("off")
    key.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7.2,
             transform=key.transAxes)
    fig.tight_layout()
    return fig


def plot_correctness(report: dict) -> plt.Figure:
    """Per-step loss of the original and the fast path on the embedded model; their differences below."""
    runs = {r["name"]: r["losses"] for r in report["runs"] if r.get("ok")}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {"original": ("#d62728", "-"), "fast": ("#2ca02c", "--")}
    names = {"original": "Camino original", "fast": "Camino rápido"}
    for name, losses in runs.items():
        path, seed = name.split("_seed")
        color, line = styles[path]
        top.plot(range(1, len(losses) + 1), losses, color=color, linestyle=line, alpha=1.0 if seed == "0" else 0.45,
                 linewidth=1.3, label=f"{names[path]}, semilla {seed}")
    top.set_ylabel("Pérdida por paso")
    top.set_title(f"Camino rápido vs. original: misma pérdida ({report.get('model')}, {report.get('dtype')}, "
                  f"{report.get('device', '')})", fontsize=10)
    top.legend(fontsize=8)
    seeds = sorted({n.split("_seed")[1] for n in runs})
    for seed in seeds:
        a, b = runs.get(f"original_seed{seed}"), runs.get(f"fast_seed{seed}")
        if a and b:
            bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color="#2ca02c",
                        alpha=1.0 if seed == seeds[0] else 0.5, label=f"rápido − original, semilla {seed}")
    if len(seeds) >= 2 and all(f"original_seed{s}" in runs for s in seeds[:2]):
        a, b = runs[f"original_seed{seeds[0]}"], runs[f"original_seed{seeds[1]}"]
        bottom.plot(range(1, len(a) + 1), [y - x for x, y in zip(a, b)], color="#7f7f7f", linestyle=":",
                    label=f"original semilla {seeds[1]} − semilla {seeds[0]} (ruido)")
    bottom.axhline(0, color="black", linewidth=0.6)
    bottom.set_xlabel("Paso de optimización")
    bottom.set_ylabel("Diferencia de pérdida")
    bottom.legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def draw_figures(path: Path) -> list[Path]:
    """Redraw the figure of a benchmark or correctness JSON with ``save_figure`` (a tiny test run: next to it)."""
    set_style()
    report = load_report(path)
    if "tiny" in report.get("label", "") or report.get("model") not in (None, "embedded"):
        os.environ["QLORA_FIGURES_DIR"] = str(path.parent)
    if "runs" in report:
        return [save_figure(plot_correctness(report), CORRECTNESS_FIGURE, show=False)]
    return [save_figure(plot_benchmark(report), FIGURE, show=False)]
