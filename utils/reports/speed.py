"""Notebook 04's speed prose: what the committed GPU measurements show (Spanish Markdown, numbers read from them)."""

from __future__ import annotations

from utils.numbers import fmt_num, fmt_ratio, fmt_unit
from utils.plotting import label
from utils.plotting.speed import config_label
from utils.speed import FastPathOptions
from utils.speed.results import merged_rows
from utils.units import BUDGET_GIB


def _measured_on(speed: dict) -> str:
    """Where and when the speed run was measured, and the allocator cap it ran under."""
    line = (f"Medido en {speed['device']} el {speed['date'][:10]} sobre el gemelo de Llama-3.2-3B "
            "(pesos aleatorios: la velocidad y la memoria no dependen de los valores).")
    if speed.get("memory_cap_gib"):
        cap = fmt_unit(speed["memory_cap_gib"], "GiB", 1)
        line += (f" Cada fila corrió con el asignador de PyTorch limitado a {cap}, como en "
                 "una tarjeta de 8 GB: al llegar al límite devuelve bloques en caché y reintenta (columna "
                 "«reintentos del asignador»).")
    return line


def _best_lines(s: dict, orig: dict) -> list[str]:
    """The best fast configuration of each dtype against the original, then against Unsloth's best."""
    lines = []
    for dtype in ("bf16", "fp16"):
        best = s.get(f"fast_best_{dtype}")
        if best:
            lines.append(f"- Mejor configuración rápida en {dtype} dentro de {fmt_unit(BUDGET_GIB, 'GiB', 1)} "
                         f"reservados: {config_label(best['name'])}, {fmt_num(best['tokens_per_second'])} tokens/s "
                         f"con {fmt_unit(best['peak_reserved_gib'], 'GiB', 2)}, **{fmt_ratio(best['x_original_fp16'], 1)}** "
                         f"la configuración original ({fmt_num(orig['tokens_per_second'])} tokens/s, fp16).")
    for dtype in ("bf16", "fp16"):
        best, peer = s.get(f"fast_best_{dtype}"), s.get(f"unsloth_best_{dtype}")
        if best and peer:
            lines.append(f"- Unsloth en la misma corrida ({dtype}, dentro del mismo presupuesto): "
                         f"{config_label(peer['name'])}, {fmt_num(peer['tokens_per_second'])} tokens/s; el camino "
                         f"rápido hace **{fmt_ratio(best['x_unsloth_best'])}** eso.")
    return lines


def _recipe_lines(s: dict, rows: dict[str, dict]) -> list[str]:
    """The original recipe (2 sequences per step, fp16) on both paths, and with PyTorch's ops instead of Liger's."""
    recipe = s.get("recipe_fp16")
    if not recipe:
        return []
    line = (f"- La receta original (2 secuencias por paso, fp16): {fmt_num(recipe['original_seconds_per_step'], 3)} → "
            f"{fmt_num(recipe['fast_seconds_per_step'], 3)} s por paso (**{fmt_ratio(recipe['x_fewer_seconds'])}** "
            f"menos), pico asignado {fmt_num(recipe['original_peak_allocated_gib'], 2)} → "
            f"{fmt_unit(recipe['fast_peak_allocated_gib'], 'GiB', 2)}. Los dos pasos de 2 secuencias están limitados por la "
            "CPU de la máquina, compartida: su cociente varía de una corrida a otra (ver "
            "`results/04_speed_notes.md`).")
    torch_ops = rows.get("fast_2x1_torch_kernels_fp16")
    if torch_ops:
        line += (f" Con las operaciones de PyTorch en lugar de los núcleos de Liger (lo que el camino rápido "
                 f"elige hoy para pasadas de menos de {fmt_num(FastPathOptions().small_pass_tokens)} tokens): "
                 f"{fmt_num(torch_ops['seconds_per_step'], 3)} s por paso, "
                 f"**{fmt_ratio(recipe['original_seconds_per_step'] / torch_ops['seconds_per_step'])}** menos.")
    return [line]


def _corpus_lines(speed: dict, corpus: dict | None) -> list[str]:
    """The best fast configuration on the real examples (from ``corpus`` when the speed run has no corpus rows)."""
    corpus_run = corpus if corpus is not None else speed
    best = corpus_run["summary"].get("corpus_fast_best_bf16")
    if not best:
        return []
    where = "" if corpus is None else f"; {corpus_run['device']}, {corpus_run['date'][:10]}"
    line = (f"- Con los ejemplos reales del corpus (sin relleno{where}): {config_label(best['name'])}, "
            f"{fmt_num(best['tokens_per_second'])} tokens reales/s")
    if best.get("x_original_corpus_fp16"):
        line += (f", **{fmt_ratio(best['x_original_corpus_fp16'], 1)}** la configuración original con los mismos "
                 "ejemplos (cortos: el original procesa uno por micro-lote)")
    return [line + "."]


def _correctness_lines(speed: dict, correctness: dict) -> list[str]:
    """The fast path's loss against the original's, next to the gap between two seeds of the original."""
    comp = correctness.get("comparison", {})
    if "fast_vs_original_seed0" not in comp:
        return []
    noise = comp.get("original_seed_vs_seed")
    word = "menor" if noise is not None and comp["fast_vs_original_seed0"] <= noise else "mayor"
    line = (f"- Corrección ({label(correctness['model'])}, {correctness['steps']} pasos, {correctness['dtype']}; "
            f"{correctness.get('device', 'GPU')}, {str(correctness.get('date', ''))[:10]}): "
            f"diferencia media por paso rápido–original {fmt_num(comp['fast_vs_original_seed0'], 4)}, {word} que "
            f"la diferencia entre dos semillas del original ({fmt_num(noise, 4)}).")
    if str(correctness.get("date", "")) < str(speed.get("date", "")):
        line += (" Se midió antes que esta corrida de velocidad; los cambios posteriores del camino rápido, "
                 "si los hay, están cubiertos por pruebas que comparan pérdida y gradientes con PEFT.")
    return [line]


def _ddp_lines(ddp: dict) -> list[str]:
    """Tokens/s on N GPUs (``accelerate launch``) against one GPU."""
    if not ddp.get("speedup"):
        return []
    return [f"- Con `accelerate launch` en {ddp['runs'][-1]['gpus']} GPU ({ddp.get('device', 'GPU')}, "
            f"{str(ddp.get('date', ''))[:10]}): **{fmt_ratio(ddp['speedup'])}** los tokens/s de una GPU con la misma "
            "configuración por GPU."]


def _variability_line() -> str:
    """Why ratios against the original move between runs (its step is bound by the machine's CPU)."""
    return ("- El paso original está limitado por la CPU de la máquina, que varía de una corrida a otra, y con él los "
            "cocientes: en corridas de otro día u otra máquina pueden quedar por encima o por debajo (todas las "
            "corridas, en `results/04_speed_notes.md`).")


def describe_speed(speed: dict, correctness: dict, ddp: dict, corpus: dict | None = None) -> str:
    """What the committed GPU measurements show, with every number read from them (Markdown, Spanish).

    ``corpus``: a run of the corpus rows (real examples) when the speed run has none.
    """
    s = speed["summary"]
    rows = {r["name"]: r for r in merged_rows(speed["rows"])}
    orig = rows["original_fp16"]
    lines = [_measured_on(speed), *_best_lines(s, orig), *_recipe_lines(s, rows), *_corpus_lines(speed, corpus),
             *_correctness_lines(speed, correctness), *_ddp_lines(ddp), _variability_line()]
    return "\n".join(lines)
