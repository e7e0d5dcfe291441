"""The baselines (BM25 retrieval, few-shot prompting) and what sits around them in notebook 05: every system
answered by one model, forgetting on general questions, the comparable-runs filter and the GPU results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pandas as pd
import pytest
import yaml

from utils import evaluation as ev
from utils.data import answer_of, load_records, question_of
from utils.paths import REPO_ROOT, TEST_FILE, TRAIN_FILE


def _record(rid: str, question: str, answer: str, kind: str = "fact", facts: tuple[str, ...] = ()) -> dict:
    return {"id": rid, "kind": kind, "topic": "t", "keywords": [], "facts": list(facts),
            "messages": [{"role": "system", "content": "Sistema."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


TRAIN = [
    _record("a", "¿Plazo?", "Según la Ord. 1549, art. 1.2, el plazo es de 30 días hábiles.", facts=("F1",)),
    _record("b", "¿Plazo, otra vez?", "Según la Ord. 1549, art. 1.2, el plazo es de 30 días hábiles.", facts=("F1",)),
    _record("c", "¿Práctica?", "Según la Ord. 973, la práctica supervisada dura 200 horas.", facts=("F2",)),
    _record("d", "¿Horario?", "La normativa disponible no establece horarios.", kind="out_of_scope"),
    _record("e", "¿Capítulos?", "Según el índice de la Ord. 1549, tiene 10 capítulos.", facts=("F3",)),
]


# --------------------------------------------------------------------------------------------
# Retrieval and few-shot prompts
# --------------------------------------------------------------------------------------------


def test_retriever_indexes_distinct_answers_and_ranks_the_matching_one_first():
    retriever = ev.build_retriever(TRAIN)
    assert len(retriever.passages) == 4  # "a" and "b" share their answer
    top = retriever.search("cuántas horas dura la práctica supervisada", 2)
    assert retriever.passages[top[0]].startswith("Según la Ord. 973")
    assert len(retriever.search("palabras que no existen xyz", 3)) == 3  # still k passages, never an error


@pytest.mark.parametrize("preset, started_on", [(None, "cpu"), ("cuda", "cuda")])
def test_importing_the_baselines_keeps_jax_off_the_gpu_unless_the_user_chose(monkeypatch, preset, started_on):
    """Where JAX is installed, importing bm25s starts it (``jax.lax.top_k``); on a GPU JAX takes 75 % of the card.

    The module is executed afresh, with bm25s not yet imported and a stand-in for JAX that writes down the platform
    JAX would start on (JAX_PLATFORMS, read when JAX starts its first backend).
    """
    started = []

    def top_k(scores, k):
        started.append(os.environ.get("JAX_PLATFORMS", "<unset>"))
        order = np.argsort(-np.asarray(scores))[:k]
        return np.asarray(scores)[order], order

    fake_jax, fake_lax = types.ModuleType("jax"), types.ModuleType("jax.lax")
    fake_lax.top_k, fake_jax.lax = top_k, fake_lax
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setitem(sys.modules, "jax.lax", fake_lax)
    for name in [n for n in sys.modules if n == "bm25s" or n.startswith("bm25s.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    if preset:
        monkeypatch.setenv("JAX_PLATFORMS", preset)
    spec = importlib.util.spec_from_file_location("baselines_afresh", REPO_ROOT / "utils/evaluation/baselines.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert started == [started_on]


def test_retrieval_on_the_shipped_corpus_finds_most_taught_facts():
    train, test = load_records(TRAIN_FILE), load_records(TEST_FILE)
    prompts = ev.build_prompts(["base", "base_rag"], train, test, ev.system_prompt_of(test), retrieval_k=3)
    hits = ev.retrieval_hits(prompts, test)
    facts = [h for h, r in zip(hits, test) if r["kind"] == "fact"]
    assert sum(facts) / len(facts) > 0.5  # a lexical retriever finds the taught answer of most new phrasings
    assert not any(h for h, r in zip(hits, test) if r["kind"] == "out_of_scope")


def test_retrieval_chat_puts_the_passages_before_the_question():
    prompts = ev.build_prompts(["base_rag"], TRAIN, [TRAIN[2]], "Sistema.", retrieval_k=2)
    [chat], [hits] = prompts.chats("base_rag", [TRAIN[2]])
    assert [m["role"] for m in chat] == ["system", "user"]
    text = chat[-1]["content"]
    assert text.startswith("Fragmentos de la normativa recuperados") and text.endswith("Pregunta: ¿Práctica?")
    assert "[1] Según la Ord. 973" in text and len(hits) == 2


def test_few_shot_examples_cover_kinds_avoid_asked_facts_and_are_seeded():
    asked = [_record("q", "¿Plazo de nuevo?", "x", facts=("F1",))]
    examples = ev.pick_few_shot(TRAIN, asked, 2, seed=1)
    assert {e["kind"] for e in examples} == {"fact", "out_of_scope"}
    assert not any("F1" in e["facts"] for e in examples)  # no example hands over the asked fact's answer
    assert examples == ev.pick_few_shot(TRAIN, asked, 2, seed=1)
    prompts = ev.build_prompts(["few_shot"], TRAIN, asked, "Sistema.", few_shot_k=2, seed=1)
    [chat], _ = prompts.chats("few_shot", asked)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat[-1]["content"] == "¿Plazo de nuevo?"


def test_unknown_baseline_names_the_allowed_ones():
    assert ev.check_systems(["tuned_rag", "base_rag"]) == ["base", "base_rag", "tuned", "tuned_rag"]
    with pytest.raises(ValueError, match="base_rag"):
        ev.check_systems(["rag"])


# --------------------------------------------------------------------------------------------
# Every system on the embedded model, summaries with contrasts
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_model():
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.modeling import load_model

    torch.manual_seed(0)
    return get_peft_model(load_model("embedded", device="cpu"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                     task_type="CAUSAL_LM"))


def test_every_system_answers_every_record_with_its_own_prompt(peft_model, embedded_tokenizer):
    records = [TRAIN[2], TRAIN[3]]
    systems = list(ev.SYSTEMS)
    prompts = ev.build_prompts(systems, TRAIN, records, "Sistema.", retrieval_k=1, few_shot_k=1)
    timings: dict[str, float] = {}
    rows = ev.run_predictions(peft_model, embedded_tokenizer, records, 4, batch_size=2, progress=False,
                              systems=systems, prompts=prompts, timings=timings)
    assert set(timings) == set(systems)
    for row in rows:
        assert all(f"answer_{s}" in row and row[f"tokens_{s}"] <= 4 for s in systems)
        assert len(row["retrieved"]) == 1 and isinstance(row["retrieval_hit"], bool)
    assert rows[0]["retrieval_hit"]  # the practice question retrieves its own answer
    scores = ev.score_predictions(rows, "Sistema.")
    assert set(scores["model"]) == {*systems, "reference"}
    summary = ev.summarize_scores(scores, n_boot=50, seed=0)
    assert {"delta", "delta:tuned:base_rag", "delta:base_rag:base"} <= set(summary["model"])
    table = ev.metrics_table(summary, systems)
    assert list(table.columns) == [ev.SYSTEM_LABELS[s] for s in systems]
    contrasts = ev.contrasts_table(summary, ["keyword_recall", "strict_correct"])
    assert "Ajustado (LoRA) − Base + BM25" in set(contrasts["Diferencia"])


def test_intervals_print_in_es_ar():
    assert ev.format_interval(0.5, 0.25, 0.75, 2) == "0,50 [0,25; 0,75]"
    assert ev.format_interval(0.1, -0.05, 0.2, 2, signed=True) == "+0,10 [-0,05; +0,20]"
    assert ev.format_interval(math.nan, 0, 0, 2) == "—"


# --------------------------------------------------------------------------------------------
# Forgetting
# --------------------------------------------------------------------------------------------


def test_general_questions_file_in_both_layouts(tmp_path):
    listed = tmp_path / "a.yaml"
    listed.write_text(yaml.safe_dump([{"question": "¿Capital de Francia?", "answer": "París."}]), encoding="utf-8")
    mapped = tmp_path / "b.yaml"
    mapped.write_text(yaml.safe_dump({"system_prompt": "Sé breve.", "items": [
        {"id": "G1", "questions": ["¿Uno?", "¿Dos?"], "answer": "Sí."}]}), encoding="utf-8")
    [one] = ev.load_general_records(listed)
    assert [m["role"] for m in one["messages"]] == ["user", "assistant"]
    two = ev.load_general_records(mapped)
    assert [r["id"] for r in two] == ["G1-1", "G1-2"] and two[0]["messages"][0]["content"] == "Sé breve."
    broken = tmp_path / "c.yaml"
    broken.write_text(yaml.safe_dump([{"question": "¿Sin respuesta?"}]), encoding="utf-8")
    with pytest.raises(ev.GeneralSetError, match="item 1 needs an 'answer'"):
        ev.load_general_records(broken)


def test_forgetting_compares_base_and_tuned_loss(peft_model, embedded_tokenizer, tmp_path):
    general = [_record("g1", "¿Capital de Francia?", "La capital de Francia es París."),
               _record("g2", "¿Cuántos días tiene una semana?", "Una semana tiene siete días.")]
    scores = ev.forgetting_scores(peft_model, embedded_tokenizer, general, batch_size=2)
    assert set(scores["model"]) == {"base", "tuned"} and len(scores) == 4
    summary = ev.summarize_scores(scores, n_boot=50, seed=0, metrics=("loss", "perplexity")).set_index(
        ["model", "metric"])
    per_question = ev.per_question_losses(scores)
    assert summary.loc[("delta", "loss"), "value"] == pytest.approx(
        (scores.query("model == 'tuned'")["nll"].sum() / scores.query("model == 'tuned'")["loss_tokens"].sum())
        - (scores.query("model == 'base'")["nll"].sum() / scores.query("model == 'base'")["loss_tokens"].sum()))
    assert list(per_question.columns) == ["id", "base", "tuned", "delta"]


def test_shipped_general_questions_load_when_present():
    from utils.paths import DATASET_DIR

    path = DATASET_DIR / "sources" / "general_es.yaml"
    if not path.is_file():
        pytest.skip("dataset/sources/general_es.yaml is not in this checkout yet")
    records = ev.load_general_records(path)
    assert len(records) >= 10 and all(answer_of(r["messages"]) and question_of(r["messages"]) for r in records)


# --------------------------------------------------------------------------------------------
# Comparable runs and committed GPU results
# --------------------------------------------------------------------------------------------


def _write_run(folder, profile: str, n: int, model: str = "embedded", value: float = 0.5,
               ids: list[str] | None = None, limit: int | None = None) -> None:
    folder.mkdir(parents=True)
    rows = [{"model": "tuned", "metric": "keyword_recall", "value": value, "low": value - 0.1,
             "high": value + 0.1, "n": n, "label": "x"}]
    payload = {"parameters": {"profile": profile, "model_name": model, "test_file": "t.jsonl",
                              "max_test_records": n if limit is None else limit},
               "n_test_records": n, "metrics": rows, "device": "cpu", "commit": "abc"}
    if ids is not None:
        payload["test_ids"] = ids
    (folder / "05_metrics.json").write_text(json.dumps(payload))
    pd.DataFrame({"step": [1, 2, 2], "loss": [2.0, 1.5, None], "eval_loss": [None, None, 1.7]}).to_csv(
        folder / "04_log_history.csv", index=False)


def test_only_comparable_runs_are_collected_and_each_exclusion_says_why(tmp_path):
    _write_run(tmp_path / "demo", "demo", 40, value=0.6)
    _write_run(tmp_path / "demo_lr", "demo_lr", 40, value=0.4)
    _write_run(tmp_path / "smoke", "smoke", 4)
    _write_run(tmp_path / "other", "other", 40, model="unsloth/Llama-3.2-3B-Instruct")
    _write_run(tmp_path / "small", "small", 12)
    reference = {"model_name": "embedded", "test_file": "t.jsonl", "n_test_records": 40, "profile": "demo"}
    metrics, curves, left_out = ev.collect_runs(reference, tmp_path)
    assert sorted(metrics["run"].unique()) == ["demo", "demo_lr"] and len(curves) == 6
    reasons = left_out.set_index("corrida")["motivo"]
    assert "prueba rápida" in reasons["smoke"]
    assert reasons["other"].startswith("otro modelo")
    assert reasons["small"] == "otra cantidad de preguntas de test: 12 en vez de 40"
    table = ev.runs_table(metrics)
    assert list(table.columns) == ["demo", "demo_lr"] and table.iloc[0, 0] == "0,60 [0,50; 0,70]"


def test_runs_of_the_same_size_but_other_questions_are_not_compared(tmp_path):
    ids = [f"F{i}-q1" for i in range(4)]
    _write_run(tmp_path / "same", "same", 4, ids=ids[::-1])  # the same questions in another order
    _write_run(tmp_path / "other", "other", 4, ids=["F0-q1", "F0-q2", "F0-q3", "F0-q4"])
    _write_run(tmp_path / "old", "old", 4)  # a part of the file, chosen before the ids were recorded
    _write_run(tmp_path / "all_old", "all_old", 4, limit=0)  # the whole file, ids not recorded
    reference = {"model_name": "embedded", "test_file": "t.jsonl", "n_test_records": 4, "profile": "demo",
                 "test_ids": ids, "all_test": False}
    metrics, _, left_out = ev.collect_runs(reference, tmp_path)
    assert sorted(metrics["run"].unique()) == ["same"]
    reasons = left_out.set_index("corrida")["motivo"]
    assert reasons["other"].startswith("otras preguntas de test") and "no registra" in reasons["old"]
    whole = {**reference, "all_test": True}  # both evaluated the whole file: the ids are implied
    assert sorted(ev.collect_runs(whole, tmp_path)[0]["run"].unique()) == ["all_old", "same"]


