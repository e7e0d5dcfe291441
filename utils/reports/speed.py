"""Notebook 04's speed prose: what the committed GPU measurements show (Spanish Markdown, numbers read from them).

``describe_speed``: the round-5 headline run (PyTorch's allocator capped at 7.5 GiB reserved, which leaves out the
CUDA context and the paged optimizer; the strict run is the one that models an 8 GB card). ``describe_strict``: the
run under the strict 8 GB budget (``run --budget strict8``), led by the ratios that hold on any host, and the ratio
to the original with its spread across the committed invocations (``utils.speed.results.original_spread``);
``strict_missing`` says which command writes that run while it is not committed. ``strict_table`` (re-exported from
``utils.speed.benchmark.strict``) is its table; ``strict_table_shown`` the same for a reader.
"""

from __future__ import annotations

from typing import Any

from pandas.io.formats.style import Styler

from utils.numbers import fmt_num, fmt_ratio, fmt_unit
from utils.plotting import label
from utils.plotting.speed import config_label
from utils.speed import FastPathOptions
from utils.speed.benchmark.strict import (RECIPE_PAIRS, RECIPE_ROWS, UNSLOTH_GOAL, measured_rounds, strict_table,
                                        unsloth_goal)
from utils.speed.results import STRICT8_REPORT, merged_rows, original_spread, speed_table
from utils.units import BUDGET_GIB

__all__ = ["describe_speed", "describe_strict", "goal1_summary", "strict_command", "strict_missing", "speed_table_shown",
           "strict_table", "strict_table_shown"]

WORKLOAD_NAMES = {"synthetic": "sintética", "corpus": "corpus"}  # the benchmark's two workloads (workloads.py)


def strict_table_shown(report: dict) -> Styler:
    """``strict_table`` for a reader: es-AR numbers, «sí» / «no», the workload in Spanish, «—» where a value does not
    apply (a row that never finished has no speed; a CPU-only run no allocator retries)."""
    table = strict_table(report).copy()
    table["dentro del presupuesto"] = table["dentro del presupuesto"].map({True: "sí", False: "no"})
    table["motivo"] = table["motivo"].replace("", "—")
    return _for_a_reader(table)


def speed_table_shown(report: dict) -> Styler:
    """``utils.speed.results.speed_table`` (a speed run's rows) for a reader, as ``strict_table_shown``."""
    return _for_a_reader(speed_table(report))


def _for_a_reader(table) -> Styler:
    """A benchmark table styled es-AR: each row named in words (``config_label``, as the prose above the table names
    it; the ids stay in the JSON), the workload in Spanish, tokens/s whole, the rest with 3 decimals, «—» for NA."""
    table = table.assign(carga=table["carga"].map(lambda workload: WORKLOAD_NAMES.get(workload, workload)))
    table.index = table.index.map(config_label).rename(table.index.name)
    return (table.style.format(precision=3, decimal=",", thousands=".", na_rep="—")
            .format(precision=0, decimal=",", thousands=".", na_rep="—", subset=["tokens/s"]))


def _measured_on(speed: dict) -> str:
    """Where and when the speed run was measured, and the allocator cap it ran under."""
    line = (f"Medido en {speed['device']} el {speed['date'][:10]} sobre el gemelo de Llama-3.2-3B "
            "(pesos aleatorios: la velocidad y la memoria no dependen de los valores).")
    if speed.get("memory_cap_gib"):
        cap = fmt_unit(speed["memory_cap_gib"], "GiB", 1)
        line += (f" Regla de esta corrida: el asignador de PyTorch limitado a {cap} reservados (al llegar al límite "
                 "devuelve bloques en caché y reintenta: columna «reintentos del asignador»). Ese límite no cuenta el "
                 "contexto CUDA ni lo que el optimizador paginado ocupa fuera del asignador, así que una fila que "
                 "entra acá puede no entrar en una tarjeta de 8 GB; la que modela esa tarjeta es la corrida con el "
                 f"presupuesto estricto (`{STRICT8_REPORT}`), que cuenta pico reservado, contexto CUDA y memoria "
                 "fuera del asignador.")
    return line


def _unsloth_lines(s: dict, where: str = "en la misma corrida y el mismo presupuesto") -> list[str]:
    """The best fast configuration of each dtype against Unsloth's best, both measured ``where``; a dtype in which
    one side had no row within the budget says so."""
    lines = []
    for dtype in ("bf16", "fp16"):
        fast, peer = s.get(f"fast_best_{dtype}"), s.get(f"unsloth_best_{dtype}")
        if fast and peer:
            lines.append(f"- Frente a Unsloth, en {dtype} y {where}: "
                         f"{config_label(fast['name'])}, {fmt_num(fast['tokens_per_second'])} tokens/s, contra "
                         f"{config_label(peer['name'])}, {fmt_num(peer['tokens_per_second'])} tokens/s: "
                         f"**{fmt_ratio(fast['x_unsloth_best'])}**.")
        elif fast or peer:
            missing = "Unsloth" if fast else "el camino rápido"
            lines.append(f"- En {dtype}, {missing} no tuvo ninguna fila dentro del presupuesto: no hay cociente.")
    return lines


def _goal_line(s: dict) -> str:
    """Issue #20's goal 1 against this run: both ratios with 4 decimals (a 1.2996 must not read 1,30) and whether
    the run meets it."""
    goal = unsloth_goal(s)
    ratios = ", ".join(f"{dtype} {fmt_ratio(goal[dtype], 4) if goal[dtype] else 'no medido'}"
                       for dtype in ("bf16", "fp16"))
    verdict = "se cumple" if goal["met"] else "no se cumple en esta invocación"
    return (f"- Objetivo 1 del issue #20, al menos {fmt_ratio(goal['goal'], 1)} la mejor fila de Unsloth en bf16 y en "
            f"fp16 dentro de una misma invocación: {ratios}: **{verdict}**.")


def goal1_summary(runs: list[tuple[dict, str]]) -> str:
    """Issue #20's goal 1 over the strict runs shown one by one above it: in which invocations both dtypes reach the
    goal against Unsloth's best, and with which ratios (``runs``: ``(report, file name)`` in the order they ran).
    Spanish Markdown; each verdict is ``unsloth_goal``'s, from the rows' tokens/s, not from a rounded ratio."""
    met, missed = [], []
    for report, name in runs:
        goal = unsloth_goal(report["strict"])
        if goal["met"]:
            met.append(f"`{name}` ({report['device']}, {report['date'][:10]}: bf16 {fmt_ratio(goal['bf16'], 3)}, "
                       f"fp16 {fmt_ratio(goal['fp16'], 3)})")
        else:
            missed.append(f"`{name}`")
    head = (f"**Objetivo 1 del issue #20** (al menos {fmt_ratio(UNSLOTH_GOAL, 1)} la mejor fila de Unsloth en bf16 y en "
            "fp16, en una misma invocación)")
    if not met:
        return f"{head}: **ninguna de estas corridas lo cumple**."
    text = f"{head}: **se cumple** en {', '.join(met)}"
    if missed:
        text += f"; no en {', '.join(missed)}"
    return text + ". Cada cociente compara filas de una misma invocación; las máquinas difieren entre sí."


def _original_lines(s: dict, orig: dict, spread: dict) -> list[str]:
    """The best fast configuration of each dtype against the original, then that ratio's spread across hosts."""
    lines = []
    for dtype in ("bf16", "fp16"):
        best = s.get(f"fast_best_{dtype}")
        if best:
            lines.append(f"- Contra la configuración original ({fmt_num(orig['tokens_per_second'])} tokens/s, fp16, "
                         f"en esta corrida): la mejor configuración rápida en {dtype} dentro de "
                         f"{fmt_unit(BUDGET_GIB, 'GiB', 1)} reservados, {config_label(best['name'])}, hace "
                         f"{fmt_num(best['tokens_per_second'])} tokens/s con "
                         f"{fmt_unit(best['peak_reserved_gib'], 'GiB', 2)}: **{fmt_ratio(best['x_original_fp16'], 1)}**.")
    best = s.get("fast_best_bf16") or s.get("fast_best_fp16")
    return lines + _spread_lines(spread, best)


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


def _examples_line(ddp: dict) -> str:
    """Which examples each run of the DDP file saw: tokens, examples and tokens per example, one GPU first (a
    tokens/s ratio is per token, but longer examples make each step more efficient)."""
    parts = []
    for run in ddp["runs"]:
        examples = run["global_step"] * ddp["per_device_batch"] * run["gpus"]
        parts.append(f"{'una GPU' if run['gpus'] == 1 else str(run['gpus']) + ' GPU'}: "
                     f"{fmt_num(run['tokens_trained'])} tokens en {fmt_num(examples)} ejemplos, "
                     f"{fmt_num(run['tokens_trained'] / examples, 1)} por ejemplo")
    return "; ".join(parts)


def _ddp_lines(ddp: dict) -> list[str]:
    """Tokens/s on N GPUs (``accelerate launch``) against one GPU, and the caveat that the runs saw other examples
    when their token counts per example differ."""
    if not ddp.get("speedup"):
        return []
    line = (f"- Con `accelerate launch` en {ddp['runs'][-1]['gpus']} GPU ({ddp.get('device', 'GPU')}, "
            f"{str(ddp.get('date', ''))[:10]}): **{fmt_ratio(ddp['speedup'])}** los tokens/s de una GPU con la misma "
            "configuración por GPU, medido con el camino rápido de ese día (el código cambió mucho desde entonces y "
            "no hubo otra máquina de dos GPU para medirlo de nuevo).")
    runs = ddp.get("runs") or []
    if ddp.get("per_device_batch") and len(runs) > 1 and all(r.get("tokens_trained") for r in runs):
        per_example = {round(r["tokens_trained"] / (r["global_step"] * ddp["per_device_batch"] * r["gpus"]), 1)
                       for r in runs}
        if len(per_example) > 1:
            line += (" Los tokens/s se cuentan por token, así que se pueden comparar, pero las corridas no vieron los "
                     f"mismos ejemplos ({_examples_line(ddp)}): con ejemplos más largos cada paso rinde algo más, así "
                     "que un cociente por encima del número de GPU no prueba una escala mejor que lineal.")
    return [line]


def describe_speed(speed: dict, correctness: dict, ddp: dict, corpus: dict | None = None,
                   spread: dict | None = None) -> str:
    """What the committed GPU measurements show, with every number read from them (Markdown, Spanish).

    First the ratios that hold on any host (the original recipe's speed-up, the ratio to Unsloth), then the ratio
    to the original configuration with its spread across the committed invocations (``spread``, default
    ``original_spread()``). ``corpus``: a run of the corpus rows (real examples) when the speed run has none.
    """
    s = speed["summary"]
    rows = {r["name"]: r for r in merged_rows(speed["rows"])}
    orig = rows["original_fp16"]
    spread = original_spread() if spread is None else spread
    lines = [_measured_on(speed), *_recipe_lines(s, rows), *_unsloth_lines(s), *_original_lines(s, orig, spread),
             *_corpus_lines(speed, corpus), *_correctness_lines(speed, correctness), *_ddp_lines(ddp)]
    return "\n".join(lines)


# The strict 8 GB run (issue #20): the ratios that hold on any host first, then the one that moves with the host

def strict_command(out: str = STRICT8_REPORT) -> str:
    """The command that writes the strict run: every default row, the original recipe's rows repeated 5 times."""
    return (f"python -m utils.speed.benchmark run --budget strict8 --repeat 5 --repeat-only {','.join(RECIPE_ROWS)} "
            f"--out {out}")


def strict_missing(out: str = STRICT8_REPORT) -> str:
    """One Markdown line for a notebook run before the strict run is committed: which command writes it."""
    return (f"La corrida con el presupuesto estricto de 8 GB (`{out}`) todavía no está en el repositorio; la escribe, "
            f"en una GPU, `{strict_command(out)}`. Abajo, la corrida de la ronda 5.")


def _recipe_name(key: str) -> str:
    """A ``RECIPE_PAIRS`` key in words: which examples, and whether the fast step replays CUDA graphs."""
    examples = "ejemplos reales del corpus" if "corpus" in key else "gemelo, 512 tokens por secuencia"
    return examples + (", paso rápido repetido desde grafos CUDA" if "graphs" in key else "")


def _strict_recipe_lines(s: dict) -> list[str]:
    """The original recipe (2 sequences per step, fp16): medians of the interleaved repeats and the paired spread."""
    lines = []
    for key, _, _ in RECIPE_PAIRS:
        r = s.get(key)
        if not r:
            continue
        rounds = (f"medianas de {r['repeats']} rondas intercaladas" if r["repeats"] > 1
                  else "una sola ronda con las dos filas")
        lines.append(f"- Receta original (2 secuencias por paso, fp16; {_recipe_name(key)}): "
                     f"{fmt_num(r['original_seconds_per_step'], 3)} → {fmt_num(r['fast_seconds_per_step'], 3)} s por "
                     f"paso, {rounds}: **{fmt_ratio(r['x_fewer_seconds'])} menos** ({config_label(r['fast'])}); "
                     f"ronda por ronda, de {fmt_ratio(r['paired_min'])} a {fmt_ratio(r['paired_max'])}.")
    return lines


def _strict_use_line(s: dict, rules: dict) -> str:
    """Where each row's budget use is: the table; the best rows' use in words."""
    line = (f"- Uso del presupuesto, fila por fila, en la tabla de abajo: pico reservado + memoria fuera del "
            f"asignador (el optimizador paginado, como mínimo) + contexto CUDA ≤ "
            f"{fmt_unit(rules['device_limit_gib'], 'GiB', 1)} en la GPU, y ≤ "
            f"{fmt_unit(rules['pinned_limit_gib'], 'GiB', 0)} de memoria fijada en la CPU.")
    best = {dtype: s[f"fast_best_{dtype}"] for dtype in ("bf16", "fp16") if s.get(f"fast_best_{dtype}")}
    if best:
        line += " Las mejores filas rápidas usan " + "; ".join(
            f"{fmt_unit(b['device_gib'], 'GiB', 2)} de GPU y {fmt_unit(b['pinned_host_gib'], 'GiB', 2)} fijados "
            f"({dtype})" for dtype, b in best.items()) + "."
    return line


def _strict_original_lines(report: dict, spread: dict) -> list[str]:
    """The ratio to the original in this run, then the original's spread across the committed invocations."""
    s = report["strict"]
    rows = {r["name"]: r for r in merged_rows(report["rows"])}
    original, fast = rows.get("original_fp16"), s.get("fast_best_bf16")
    lines = []
    if original and fast:
        repeats = original.get("tokens_per_second_repeats") or [original["tokens_per_second"]]
        lines.append(f"- Contra la configuración original (fp16), en esta corrida: "
                     f"{fmt_num(fast['tokens_per_second'])} / {fmt_num(original['tokens_per_second'])} tokens/s (mediana; sus repeticiones, de "
                     f"{fmt_num(min(repeats))} a {fmt_num(max(repeats))}) = "
                     f"**{fmt_ratio(fast['tokens_per_second'] / original['tokens_per_second'], 1)}**.")
    lines += _spread_lines(spread, fast)
    return lines


def _spread_lines(spread: dict, fast: dict | None) -> list[str]:
    """The original's tokens/s over the committed invocations, and the ratio's range that follows from it."""
    o, x = spread["original_tokens_per_second"], spread["x_original"]
    if not o["n"]:
        return []
    line = (f"- Ese cociente depende de la máquina: el paso original está limitado por la CPU. En {o['n']} "
            f"invocaciones guardadas en `results/` ({', '.join(spread['devices'])}) el original corrió a "
            f"{fmt_num(o['min'])}–{fmt_num(o['median'])}–{fmt_num(o['max'])} tokens/s (mínimo–mediana–máximo)")
    if x["n"]:
        line += (f", y la mejor fila rápida de cada una dentro de {fmt_unit(BUDGET_GIB, 'GiB', 1)} reservados hizo "
                 f"{fmt_ratio(x['min'], 1)}–{fmt_ratio(x['median'], 1)}–{fmt_ratio(x['max'], 1)} el original "
                 f"({x['n']} invocaciones con esa fila)")
    line += "."
    if fast:
        tps = fast["tokens_per_second"]
        line += (f" Con la mejor fila de esta corrida, el cociente iría de {fmt_ratio(tps / o['max'], 1)} (el "
                 f"original más rápido) a {fmt_ratio(tps / o['min'], 1)} (el más lento); "
                 f"{fmt_ratio(tps / o['median'], 1)} contra la mediana.")
    return [line]


def _strict_excluded_lines(report: dict) -> list[str]:
    """Each row that failed, ran out of the budget or was not measured against it, with its reason."""
    table = strict_table(report)
    s = report["strict"]
    lines = []
    for name in [*s.get("out_of_budget", []), *s.get("unmeasured", [])]:
        reason = table.loc[name, "motivo"] if name in table.index else ""
        if not reason:
            reason = ("sin medición del presupuesto (corrida sin GPU)" if name in s.get("unmeasured", [])
                      else "fuera del presupuesto en alguna repetición")
        lines.append(f"- Fuera de la comparación: {config_label(name)} (`{name}`): {reason}.")
    return lines


def _strict_rules_line(report: dict) -> str:
    """Where and when, and the rules every row ran under."""
    rules = report["budget"]
    return (f"Reglas ({report.get('device', 'GPU')}, {str(report.get('date', ''))[:10]}; las mismas para todas las "
            f"filas, Unsloth incluido): asignador de PyTorch limitado a {fmt_unit(rules['card_gib'], 'GiB', 0)} − el "
            f"contexto CUDA medido − {fmt_unit(rules['display_reserve_gib'], 'GiB', 1)} que Windows reserva para la "
            f"pantalla ({rules['display_reserve_source']}); dropout de LoRA {fmt_num(rules['lora_dropout'], 2)}; "
            f"asignador con `{rules['alloc_conf']}` en todas.")


def _strict_incomplete_lines(report: dict) -> list[str]:
    """A run stopped before its plan's end (a time limit, the GPU taken back): how much of the plan it measured."""
    plan, rows = report.get("plan") or [], report["rows"]
    if len(rows) >= len(plan):
        return []
    rounds, done = 1 + max((entry[0] for entry in plan), default=0), measured_rounds(rows)
    return [f"- **Corrida incompleta:** midió {len(rows)} de las {len(plan)} filas de su plan ({done} de sus {rounds} "
            "rondas intercaladas); las medianas de abajo son de las rondas medidas. `results/README.md` dice por "
            "qué se detuvo."]


def describe_strict(report: dict, spread: dict[str, Any] | None = None) -> str:
    """The strict 8 GB run in words (Markdown, Spanish), every number read from ``report`` and ``spread``.

    First the ratios that hold on any host (the original recipe's speed-up, the fast path against Unsloth), then the
    budget use, then the ratio to the original with its spread across invocations (``spread``: default
    ``original_spread()`` over the committed files), then the rows left out and why, then the rules.
    """
    s = report["strict"]
    if s.get("error"):
        return f"**Corrida estricta sin cocientes:** {s['error']}\n\n{_strict_rules_line(report)}"
    spread = original_spread() if spread is None else spread
    limit = fmt_unit(report["budget"]["device_limit_gib"], "GiB", 1)
    lines = ["Con el presupuesto estricto de 8 GB (issue #20), en una sola invocación:",
             *_strict_incomplete_lines(report), *_strict_recipe_lines(s),
             *_unsloth_lines(s, f"dentro de los mismos {limit}"), _goal_line(s),
             _strict_use_line(s, report["budget"]), *_strict_original_lines(report, spread),
             *_strict_excluded_lines(report), "", _strict_rules_line(report)]
    return "\n".join(lines)
