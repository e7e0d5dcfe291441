"""Evaluation of a trained LoRA adapter against its own base model on the held-out test split.

One model serves both sides: the tuned answers come from the PEFT model, the base answers from the
same weights inside ``model.disable_adapter()``, with the same prompt, chat template, greedy decoding
and ``max_new_tokens``. The metrics suit Spanish: text is lower-cased and stripped of accents before
matching, and ROUGE-L uses a tokenizer that keeps non-ASCII letters (``rouge_score``'s default one
drops them, so "año" becomes "a" + "o"). Every metric is averaged per record and gets a seeded
percentile-bootstrap confidence interval; base and tuned share the resamples, so their difference
is a paired bootstrap.

Refusal rule (documented in the notebook too), on the normalised answer:

- it *declines* when it matches ``DECLINE_PATTERN`` ("no establece", "no especifica", "no tengo
  información", "no puedo", ...);
- it *refers the student* when it matches ``POINTER_PATTERN``: a referral verb ("consultá",
  "te sugiero", "acudí", "dirigite", "averiguá") followed, in the same sentence, by the Secretaría Académica
  or the Facultad Regional (merely naming the Facultad Regional is not a referral);
- an out-of-scope question is handled correctly when the answer declines **and** refers the student;
- an answerable question is wrongly refused when the answer declines and carries none of the record's
  keywords (the corpus has answerable references that decline a detail after giving the fact, e.g.
  "... el Capítulo 7 trata el Régimen de Cursado. No leí su texto, así que no puedo darte sus reglas").

The refusal accuracy is *balanced*: the mean of the correct-refusal rate on out-of-scope questions and
the no-wrongful-refusal rate on answerable ones. A plain share over all questions would reward a model
that never refuses (about 80 % of the test questions are answerable).
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.paths import RUNS_DIR

MODELS = ("base", "tuned")
MODEL_LABELS = {"base": "Base", "tuned": "Ajustado (LoRA)", "reference": "Referencia"}
KIND_LABELS = {"fact": "hecho simple", "combined": "combinada", "out_of_scope": "fuera de alcance"}

# name -> (Spanish label, higher is better; None = neither: compared with the reference instead)
METRICS: dict[str, tuple[str, bool | None]] = {
    "keyword_recall": ("Recall de palabras clave", True),
    "rouge_l": ("ROUGE-L (F1)", True),
    "chrf": ("chrF++", True),
    "refusal_accuracy": ("Exactitud de rechazo (balanceada)", True),
    "refusal_oos": ("Rechazo correcto (fuera de alcance)", True),
    "wrongful_refusal": ("Rechazo indebido (respondibles)", False),
    "stop_rate": ("Tasa de fin con EOS", True),
    "length_tokens": ("Longitud media (tokens)", None),
    "loss": ("Pérdida de test (nats/token)", False),
    "perplexity": ("Perplejidad de test", False),
}

# Applied to normalised text (lower case, no accents): see ``normalize_text``.
DECLINE_PATTERN = re.compile(
    r"\bno (?:se )?(?:establece|especifica|contempla|preve|menciona|indica|detalla|regula)\b"
    r"|\bno (?:tengo|dispongo de|cuento con|hay) (?:informacion|datos|el texto)\b"
    r"|\bno (?:puedo|podria) (?:responder|confirmar|darte|decirte|indicarte|detallar|precisar)\b"
    r"|\bno lo se\b|\bno lei\b"
)
POINTER_PATTERN = re.compile(
    r"\b(?:consult|suger|recomend|acud|dirig|averigu)\w*\b[^.;]*?"
    r"\b(?:secretaria academica|facultad(?:es)? regional(?:es)?)\b"
)


# The parameters cell of notebook 05, in order (recorded in 05_run.json; a test checks the notebook).
PARAMETER_NAMES = (
    "profile", "model_name", "test_file", "max_test_records", "max_new_tokens", "batch_size",
    "loss_batch_size", "max_seq_length", "n_boot", "confidence", "seed", "ask_question",
    "ask_max_new_tokens", "merge_adapter", "merge_dtype", "merge_device", "merge_probe_records",
    "merge_rtol", "compare_runs",
)


def parameters_of(namespace: dict[str, Any]) -> dict[str, Any]:
    """The notebook's parameters with their values (for ``05_run.json`` and ``05_metrics.json``)."""
    return {name: namespace[name] for name in PARAMETER_NAMES}


class AdapterNotFoundError(FileNotFoundError):
    """Notebook 05 was run for a profile whose adapter notebook 04 has not written yet."""


class MergeCheckError(AssertionError):
    """The merged 16-bit model does not reproduce the adapter model's logits within tolerance."""


# --------------------------------------------------------------------------------------------
# Text normalisation and per-answer metrics
# --------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Lower case without accents (NFKD, combining marks dropped): "Académica" -> "academica", ñ -> n."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize_spanish(text: str) -> list[str]:
    """Words of a Spanish text: lower case, no accents, ``\\w+`` runs (numbers kept whole)."""
    return re.findall(r"\w+", normalize_text(text))


class SpanishTokenizer:
    """``rouge_score`` tokenizer that keeps Spanish letters (the default one drops non-ASCII)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize_spanish(text)


def _keyword_regex(keyword: str) -> re.Pattern | None:
    """Whole-word pattern of a keyword on normalised text.

    Punctuation between its words is free and a word may take a Spanish plural ending ("obligatorio"
    matches "obligatorios"); numbers match only whole ("30" is not found in "130" or "300").
    """
    words = tokenize_spanish(keyword)
    if not words:
        return None
    parts = [re.escape(w) + ("" if w.isdigit() else "(?:s|es)?") for w in words]
    return re.compile(r"(?<!\w)" + r"\W+".join(parts) + r"(?!\w)")


def keyword_hits(answer: str, keywords: Sequence[str]) -> list[bool]:
    """For each keyword, whether it appears in the answer as whole words (accent/case-insensitive)."""
    text = normalize_text(answer)
    hits = []
    for keyword in keywords:
        pattern = _keyword_regex(keyword)
        hits.append(bool(pattern and pattern.search(text)))
    return hits


def keyword_recall(answer: str, keywords: Sequence[str]) -> float:
    """Share of ``keywords`` found in ``answer``; NaN when the record has no keywords."""
    hits = keyword_hits(answer, keywords)
    return float(np.mean(hits)) if hits else math.nan


_ROUGE = None
_CHRF = None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) with the Spanish tokenizer (no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=SpanishTokenizer())
    return float(_ROUGE.score(reference, answer)["rougeL"].fmeasure)


def chrf(answer: str, reference: str) -> float:
    """Sentence chrF++ (0-100): character 6-grams plus word 2-grams (sacrebleu ``CHRF(word_order=2)``)."""
    global _CHRF
    if _CHRF is None:
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF(word_order=2)
    return float(_CHRF.sentence_score(answer, [reference]).score)


def declines(answer: str) -> bool:
    """Whether the answer says the norms do not cover the question (``DECLINE_PATTERN``)."""
    return bool(DECLINE_PATTERN.search(normalize_text(answer)))


def points_to_office(answer: str) -> bool:
    """Whether the answer refers the student to the Secretaría Académica / Facultad Regional."""
    return bool(POINTER_PATTERN.search(normalize_text(answer)))


def is_refusal(answer: str) -> bool:
    """A proper out-of-scope answer: it declines and refers the student to the Facultad Regional."""
    return declines(answer) and points_to_office(answer)


def is_wrongful_refusal(answer: str, keywords: Sequence[str]) -> bool:
    """On an answerable question: declines and gives none of the expected keywords."""
    recall = keyword_recall(answer, keywords)
    return declines(answer) and not (recall > 0)


def score_answer(answer: str, reference: str, keywords: Sequence[str], kind: str) -> dict[str, float]:
    """Every per-answer metric of one answer (refusal metrics NaN where they do not apply)."""
    out_of_scope = kind == "out_of_scope"
    refused = is_refusal(answer)
    wrongful = math.nan if out_of_scope else float(is_wrongful_refusal(answer, keywords))
    return {
        "keyword_recall": keyword_recall(answer, keywords),
        "rouge_l": rouge_l(answer, reference),
        "chrf": chrf(answer, reference),
        "declines": float(declines(answer)),
        "refusal_oos": float(refused) if out_of_scope else math.nan,
        "wrongful_refusal": wrongful,
        "refusal_accuracy": float(refused) if out_of_scope else 1.0 - wrongful,
    }


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` record indices drawn with replacement from a seeded numpy Generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Weighted mean of each resample (NaN where a resample has no weight)."""
    v = np.nan_to_num(values)[idx]
    w = weights[idx]
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (v * w).sum(axis=1) / total, np.nan)


def _weights_for(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    base = np.ones_like(values, dtype=float) if weights is None else np.asarray(weights, dtype=float)
    return np.where(np.isnan(values), 0.0, base)


def bootstrap_ci(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high): weighted mean of ``values`` (NaN = not applicable) and its percentile CI."""
    values = np.asarray(values, dtype=float)
    w = _weights_for(values, weights)
    if w.sum() == 0:
        return math.nan, math.nan, math.nan
    point = float((np.nan_to_num(values) * w).sum() / w.sum())
    stats = _weighted_means(values, w, bootstrap_indices(len(values), n_boot, seed))
    alpha = (1 - confidence) / 2
    low, high = np.nanpercentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return point, float(low), float(high)


# --------------------------------------------------------------------------------------------
# Generation and test loss
# --------------------------------------------------------------------------------------------


def require_adapter(profile: str) -> Path:
    """``runs/<profile>/04_adapter``, or one clear error telling to run notebook 04 first."""
    from utils.training import ADAPTER_DIR, CONFIG_FILE

    run = RUNS_DIR / profile
    folder = run / ADAPTER_DIR
    needed = [folder / "adapter_config.json", folder / "adapter_model.safetensors", run / CONFIG_FILE]
    missing = [str(p.relative_to(RUNS_DIR.parent)) for p in needed if not p.is_file()]
    if missing:
        raise AdapterNotFoundError(
            f"no trained adapter for profile {profile!r} (missing {', '.join(missing)}). Run notebook 04 "
            f"first: python -m utils.runner --profile {profile} --only 04"
        )
    return folder


def load_for_evaluation(profile: str, model_name: str, device: str | torch.device | None = None):
    """(model, tokenizer, 04 config) of a profile's trained run, checked against ``model_name``.

    The model is the base loaded as in training (same quantisation) with the adapter on top; the base
    answers come from the same object with the adapter disabled.
    """
    from utils.training import CONFIG_FILE, load_trained

    require_adapter(profile)
    run = RUNS_DIR / profile
    config = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("model_name") != model_name:
        raise ValueError(
            f"notebook 04 trained runs/{profile} on model_name={config.get('model_name')!r}, but notebook 05 "
            f"was given model_name={model_name!r}. Set model_name to the trained one in the profile "
            f"(notebooks/params/{profile}.yaml), or retrain: python -m utils.runner --profile {profile} --only 04"
        )
    model, tokenizer = load_trained(run, device=device)
    return model, tokenizer, config


def setup_table(model, tokenizer, config: dict, records: Sequence[dict], max_new_tokens: int):
    """What is compared: model, quantisation, device, stop tokens, test questions per kind."""
    import pandas as pd

    from utils.training import stop_token_ids

    kinds = pd.Series([r.get("kind") for r in records]).value_counts()
    return pd.Series({
        "modelo base": config.get("model_name"),
        "cuantización (como en el entrenamiento)": config.get("quantization") or "ninguna",
        "dtype de cómputo": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dispositivo": str(_model_device(model)),
        "entrenamiento original replicado": config.get("replicate_original"),
        "tokens de fin": ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})"
                                   for i in stop_token_ids(model, tokenizer)),
        "pad": f"{tokenizer.pad_token} ({tokenizer.pad_token_id})",
        "max_new_tokens": max_new_tokens,
        "preguntas de test": len(records),
        **{f"  de tipo {k}": int(v) for k, v in kinds.items()},
    }).to_frame("valor")


def system_prompt_of(records: Sequence[dict]) -> str | None:
    """The most common system message of the records (the one training used), or None."""
    from collections import Counter

    prompts = Counter(m["content"] for r in records for m in r["messages"] if m["role"] == "system")
    return prompts.most_common(1)[0][0] if prompts else None


def prompt_of(record: dict) -> list[dict]:
    """The chat a model answers: every turn of the record but the final assistant one."""
    messages = list(record["messages"])
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left while generating (answers then start at the same column), restore after."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def adapter_state(model, enabled: bool):
    """Context in which ``model`` answers with (``enabled``) or without its LoRA adapter."""
    if enabled:
        return contextlib.nullcontext()
    if not hasattr(model, "disable_adapter"):
        raise TypeError("the base answers need a PEFT model (with disable_adapter()); got a plain model")
    return model.disable_adapter()


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def generate_answers(
    model,
    tokenizer,
    chats: Sequence[Sequence[dict]],
    max_new_tokens: int,
    batch_size: int = 8,
    adapter: bool = True,
    desc: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers to ``chats`` in left-padded batches; one dict per chat, in input order.

    Each dict: ``answer`` (decoded, special tokens dropped), ``n_tokens`` (generated before the stop
    token) and ``stopped`` (a stop token came before ``max_new_tokens``).
    """
    # Plain tqdm: a text bar that renders the same in JupyterLab, papermill and a terminal.
    from tqdm import tqdm

    from utils.training import stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    prompts = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False) for c in chats]
    # Longest first, so each batch holds prompts of similar length (little padding).
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    device = _model_device(model)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="preg.")
    was_training = model.training
    model.eval()
    try:
        with left_padding(tokenizer), adapter_state(model, adapter), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                # The chat template already holds any BOS: the tokenizer must not add a second one.
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                for i, ids in zip(batch, new):
                    end = next((k for k, t in enumerate(ids) if t in stops), None)
                    kept = ids[:end] if end is not None else ids[:max_new_tokens]
                    results[i] = {
                        "answer": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        "n_tokens": len(kept),
                        "stopped": end is not None,
                    }
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def completion_losses(
    model,
    tokenizer,
    records: Sequence[dict],
    max_seq_length: int = 512,
    batch_size: int = 4,
    adapter: bool = True,
) -> list[tuple[float, int]]:
    """Per record: (summed NLL in nats, number of scored tokens) over the reference answer.

    The scored tokens are the completion as TRL's ``SFTTrainer`` masks it (``utils.data.completion_mask``:
    the answer and its end-of-turn), after truncation to ``max_seq_length``.
    """
    import torch.nn.functional as F

    from utils.data import completion_mask

    encoded = []
    for record in records:
        ids, mask = completion_mask(tokenizer, record["messages"])
        encoded.append((ids[:max_seq_length], mask[:max_seq_length]))
    device = _model_device(model)
    pad = tokenizer.pad_token_id
    # Longest first: each batch holds sequences of similar length (little padding to compute).
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, int]] = [(math.nan, 0)] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with adapter_state(model, adapter), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = [encoded[i] for i in rows]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (ids, mask) in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                    labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
                # Logits only from the position before the first scored token on: the prompt's logits
                # (most of the sequence) would cost a vocabulary-wide matmul each for nothing.
                offset = max(min(mask.index(1) if 1 in mask else len(mask) for _, mask in batch) - 1, 0)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                               logits_to_keep=width - offset).logits
                target = labels[:, offset + 1 :].to(device)
                for row, i in enumerate(rows):
                    keep = target[row] != -100
                    nll = F.cross_entropy(logits[row, :-1][keep].float(), target[row][keep], reduction="sum")
                    results[i] = (float(nll), int(keep.sum()))
    finally:
        model.train(was_training)
    return results


def select_records(records: Sequence[dict], n: int) -> list[dict]:
    """All records when ``n <= 0``; else ``n`` of them taken round-robin over kinds (file order within)."""
    if n <= 0 or n >= len(records):
        return list(records)
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        by_kind.setdefault(record.get("kind", ""), []).append(record)
    chosen: list[dict] = []
    queues = [list(v) for v in by_kind.values()]
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    keep = {id(r) for r in chosen}
    return [r for r in records if id(r) in keep]


def run_predictions(
    model,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Base and tuned answers to every record, one flat dict per record (the predictions JSONL)."""
    from utils.data import answer_of, question_of

    chats = [prompt_of(r) for r in records]
    answers = {
        "base": generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, adapter=False,
                                 desc="Modelo base", progress=progress),
        "tuned": generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, adapter=True,
                                  desc="Modelo ajustado", progress=progress),
    }
    rows = []
    for k, record in enumerate(records):
        row = {
            "id": record["id"], "topic": record.get("topic"), "kind": record.get("kind"),
            "question": question_of(record["messages"]), "reference": answer_of(record["messages"]),
            "keywords": list(record.get("keywords") or []),
            "reference_tokens": len(tokenizer(answer_of(record["messages"]), add_special_tokens=False)["input_ids"]),
        }
        for name in MODELS:
            row[f"answer_{name}"] = answers[name][k]["answer"]
            row[f"tokens_{name}"] = answers[name][k]["n_tokens"]
            row[f"stopped_{name}"] = answers[name][k]["stopped"]
        rows.append(row)
    return rows


def add_losses(
    predictions: list[dict[str, Any]],
    model,
    tokenizer,
    records: Sequence[dict],
    max_seq_length: int = 512,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Add ``nll_<model>`` and ``loss_tokens`` (reference-answer loss) to each prediction row."""
    for name in MODELS:
        losses = completion_losses(model, tokenizer, records, max_seq_length, batch_size, adapter=name == "tuned")
        for row, (nll, count) in zip(predictions, losses):
            row[f"nll_{name}"] = nll
            row["loss_tokens"] = count
    return predictions


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    """Write rows as UTF-8 JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Read UTF-8 JSON lines."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Scores, summaries with confidence intervals
# --------------------------------------------------------------------------------------------


def score_predictions(predictions: Sequence[dict]):
    """Per record and model (base, tuned, and the reference answer as a calibration row): every metric.

    The reference row checks the rules themselves: its keyword recall should be 1, its refusal
    accuracy 1; ROUGE-L, chrF, stop rate and loss do not apply to it (NaN).
    """
    import pandas as pd

    rows = []
    for p in predictions:
        meta = {"id": p["id"], "topic": p["topic"], "kind": p["kind"]}
        for name in (*MODELS, "reference"):
            answer = p["reference"] if name == "reference" else p[f"answer_{name}"]
            scores = score_answer(answer, p["reference"], p["keywords"], p["kind"])
            if name == "reference":
                scores.update(rouge_l=math.nan, chrf=math.nan, stop_rate=math.nan,
                              length_tokens=p["reference_tokens"], nll=math.nan, loss_tokens=math.nan)
            else:
                scores.update(stop_rate=float(p[f"stopped_{name}"]), length_tokens=p[f"tokens_{name}"],
                              nll=p.get(f"nll_{name}", math.nan), loss_tokens=p.get("loss_tokens", math.nan))
            rows.append({**meta, "model": name, **scores})
    return pd.DataFrame(rows)


def loss_table(scores):
    """Test loss per model: scored tokens, loss (nats/token, token-weighted) and perplexity."""
    data = scores[scores["model"].isin(MODELS)].groupby("model")[["nll", "loss_tokens"]].sum()
    data["perdida_nats_por_token"] = data["nll"] / data["loss_tokens"]
    data["perplejidad"] = np.exp(data["perdida_nats_por_token"])
    data.index = [MODEL_LABELS[m] for m in data.index]
    return data.rename(columns={"nll": "nll_total", "loss_tokens": "tokens_con_perdida"})


def _metric_parts(scores, model: str, metric: str, ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, weights) of one metric for one model, aligned on ``ids``; the metric is the mean of the
    parts' weighted means (one part, except the balanced refusal accuracy: out-of-scope and answerable)."""
    data = scores[scores["model"] == model].set_index("id").reindex(ids)
    if metric in {"loss", "perplexity"}:
        tokens = data["loss_tokens"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_token = data["nll"].to_numpy(dtype=float) / tokens
        parts = [(per_token, np.nan_to_num(tokens))]
    elif metric == "refusal_accuracy":
        parts = [(data["refusal_oos"].to_numpy(dtype=float), None),
                 (1.0 - data["wrongful_refusal"].to_numpy(dtype=float), None)]
    else:
        parts = [(data[metric].to_numpy(dtype=float), None)]
    return [(values, _weights_for(values, weights)) for values, weights in parts]


def _statistic(parts: list[tuple[np.ndarray, np.ndarray]], idx: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Point estimate, bootstrap distribution and n of a metric; parts without data are left out."""
    points, boots, n = [], [], 0
    for values, w in parts:
        if w.sum() == 0:
            continue
        points.append(float((np.nan_to_num(values) * w).sum() / w.sum()))
        boots.append(_weighted_means(values, w, idx))
        n += int((w > 0).sum())
    if not points:
        return math.nan, np.full(len(idx), np.nan), 0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without one part: NaN, skipped
        return float(np.mean(points)), np.nanmean(np.vstack(boots), axis=0), n


def summarize_scores(scores, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95):
    """Tidy table: one row per (model, metric) with mean, CI bounds and n, plus tuned − base rows.

    All models use the same resampled record indices, so ``model == "delta"`` rows (tuned − base) are a
    paired bootstrap. Loss is token-weighted (total NLL / total tokens); perplexity = exp(loss).
    """
    import pandas as pd

    ids = sorted(scores["id"].unique())
    idx = bootstrap_indices(len(ids), n_boot, seed)
    alpha = (1 - confidence) / 2
    rows = []
    for metric in METRICS:
        stats = {}
        for model in scores["model"].unique():
            point, boot, n = _statistic(_metric_parts(scores, model, metric, ids), idx)
            if n == 0:
                continue
            if metric == "perplexity":
                point, boot = math.exp(point), np.exp(boot)
            stats[model] = (point, boot, n)
        if all(m in stats for m in MODELS):
            (p_t, b_t, n_t), (p_b, b_b, _) = stats["tuned"], stats["base"]
            stats["delta"] = (p_t - p_b, b_t - b_b, n_t)
        for model, (point, boot, n) in stats.items():
            low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)])
            rows.append({"model": model, "metric": metric, "label": METRICS[metric][0], "value": point,
                         "low": float(low), "high": float(high), "n": n})
    return pd.DataFrame(rows)


def summarize_by_group(scores, by: str, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95):
    """``summarize_scores`` within each value of ``by`` ("kind" or "topic"), base and tuned only."""
    import pandas as pd

    parts = []
    for group, data in scores[scores["model"].isin(MODELS)].groupby(by, sort=True):
        summary = summarize_scores(data, n_boot, seed, confidence)
        summary = summary[summary["metric"].isin(metrics) & summary["model"].isin(MODELS)]
        parts.append(summary.assign(group_by=by, group=group))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def metrics_table(summary, models: Sequence[str] = (*MODELS, "delta", "reference")):
    """Wide, readable table: one row per metric, "value [low, high]" per model (Spanish headers)."""
    import pandas as pd

    def cell(row) -> str:
        digits = 1 if row["metric"] in {"chrf", "length_tokens", "perplexity"} else 3
        return f"{row['value']:.{digits}f} [{row['low']:.{digits}f}, {row['high']:.{digits}f}]"

    data = summary[summary["model"].isin(models)].copy()
    data["cell"] = data.apply(cell, axis=1)
    table = data.pivot(index="metric", columns="model", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table = table[[m for m in models if m in table.columns]]
    table.index = [METRICS[m][0] for m in table.index]
    labels = {**MODEL_LABELS, "delta": "Diferencia (ajustado − base)"}
    table.columns = [labels[c] for c in table.columns]
    return table.fillna("—").rename_axis("Métrica")


def read_metrics(path: Path):
    """(summary, by_group) tables back from a ``05_metrics.json`` (figures are drawn from these)."""
    import pandas as pd

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return pd.DataFrame(data["metrics"]), pd.DataFrame(data["by_group"])


def write_metrics(summary, by_group, path: Path, parameters: dict[str, Any]) -> Path:
    """``05_metrics.json``: the tidy summary, the per-group summary and how they were computed."""
    payload = {
        "parameters": parameters,
        "definitions": {m: {"label": label, "higher_is_better": hib} for m, (label, hib) in METRICS.items()},
        "refusal_rule": {"decline": DECLINE_PATTERN.pattern, "pointer": POINTER_PATTERN.pattern},
        "metrics": json.loads(summary.to_json(orient="records")),
        "by_group": json.loads(by_group.to_json(orient="records")) if len(by_group) else [],
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Side-by-side table (notebook, CSV, LaTeX)
# --------------------------------------------------------------------------------------------


def side_by_side(predictions: Sequence[dict], scores):
    """One row per test question: question, reference, base and tuned answers, and per-answer scores."""
    import pandas as pd

    wide = scores[scores["model"].isin(MODELS)].pivot(index="id", columns="model",
                                                       values=["keyword_recall", "rouge_l"])
    rows = []
    for p in predictions:
        rows.append({
            "id": p["id"], "tipo": p["kind"], "tema": p["topic"], "pregunta": p["question"],
            "referencia": p["reference"], "base": p["answer_base"], "ajustado": p["answer_tuned"],
            "recall_base": wide.loc[p["id"], ("keyword_recall", "base")],
            "recall_ajustado": wide.loc[p["id"], ("keyword_recall", "tuned")],
            "rougeL_base": wide.loc[p["id"], ("rouge_l", "base")],
            "rougeL_ajustado": wide.loc[p["id"], ("rouge_l", "tuned")],
            "fin_base": p["stopped_base"], "fin_ajustado": p["stopped_tuned"],
            "palabras_clave": "; ".join(p["keywords"]),
        })
    return pd.DataFrame(rows)


def highlight_keywords(text: str, keywords: Sequence[str]) -> str:
    """HTML-escaped ``text`` with every keyword occurrence wrapped in ``<mark>`` (accent-insensitive)."""
    folded, origin = [], []
    for i, ch in enumerate(text):
        for c in normalize_text(ch):
            folded.append(c)
            origin.append(i)
    norm = "".join(folded)
    marked = [False] * len(text)
    for keyword in keywords:
        pattern = _keyword_regex(keyword)
        for match in pattern.finditer(norm) if pattern else ():
            for k in range(origin[match.start()], origin[match.end() - 1] + 1):
                marked[k] = True
    out, inside = [], False
    for ch, flag in zip(text, marked):
        if flag != inside:
            out.append("<mark>" if flag else "</mark>")
            inside = flag
        out.append(html.escape(ch))
    if inside:
        out.append("</mark>")
    return "".join(out)


def style_side_by_side(table):
    """Styler for the notebook: wrapped text, keywords highlighted, scores coloured 0 (red) – 1 (green)."""
    shown = table.drop(columns=["tema", "palabras_clave"]).copy()
    keywords = table["palabras_clave"].str.split("; ")
    for column in ("referencia", "base", "ajustado"):
        shown[column] = [highlight_keywords(t, k) for t, k in zip(table[column], keywords)]
    shown["pregunta"] = table["pregunta"].map(html.escape)
    for column in ("fin_base", "fin_ajustado"):
        shown[column] = table[column].map({True: "sí", False: "no"})
    scores = ["recall_base", "recall_ajustado", "rougeL_base", "rougeL_ajustado"]
    headers = {"recall_base": "recall base", "recall_ajustado": "recall ajustado", "rougeL_base": "ROUGE-L base",
               "rougeL_ajustado": "ROUGE-L ajustado", "fin_base": "fin base", "fin_ajustado": "fin ajustado"}
    return (
        shown.style.hide(axis="index")
        .relabel_index([headers.get(c, c) for c in shown.columns], axis="columns")
        .format("{:.2f}", subset=scores, na_rep="—")
        .background_gradient(cmap="RdYlGn", vmin=0, vmax=1, subset=scores)
        .set_properties(subset=["pregunta", "referencia", "base", "ajustado"],
                        **{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top",
                           "min-width": "14em", "max-width": "26em"})
        .set_table_styles([{"selector": "th", "props": "text-align: left;"},
                           {"selector": "mark", "props": "background-color: #ffe08a; padding: 0;"}])
    )


def write_latex_longtable(table, path: Path, caption: str, label: str = "tab:05_respuestas") -> Path:
    """Question, reference, base and tuned answers as an escaped LaTeX ``longtable`` (needs ``longtable``)."""
    columns = {"pregunta": "Pregunta", "referencia": "Referencia", "base": "Modelo base",
               "ajustado": "Modelo ajustado"}
    data = table[list(columns)].rename(columns=columns)
    # A blank line inside a p{} cell would end the paragraph: keep each answer on one line.
    data = data.apply(lambda col: col.str.replace(r"\s+", " ", regex=True).str.strip())
    latex = data.to_latex(
        index=False, longtable=True, escape=True, caption=caption, label=label,
        column_format=r"p{0.19\linewidth}p{0.25\linewidth}p{0.25\linewidth}p{0.25\linewidth}",
    )
    latex = latex.replace("Continued on next page", "Continúa en la página siguiente")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "% UTF-8 text. Needs \\usepackage{longtable} and \\usepackage{booktabs}.\n"
    path.write_text(header + latex, encoding="utf-8")
    return path


def latex_preview(path: Path, lines: int = 24) -> str:
    """Markdown code block with the first ``lines`` lines of a ``.tex`` file (and how many follow)."""
    text = Path(path).read_text(encoding="utf-8").splitlines()
    rest = f"\n% … {len(text) - lines} líneas más en {Path(path).name}" if len(text) > lines else ""
    return "```latex\n" + "\n".join(text[:lines]) + rest + "\n```"


# --------------------------------------------------------------------------------------------
# Qualitative picks
# --------------------------------------------------------------------------------------------


def pick_examples(scores):
    """The records the notebook shows in full, by a fixed rule.

    Quality of an answer = mean of keyword recall, ROUGE-L and chrF/100 (NaN ignored); Δ = tuned − base.
    *helped most* = answerable record with the largest Δ, *hurt most* = answerable record with the
    smallest Δ, *out of scope* = out-of-scope record with the largest gain in refusal correctness, then
    the largest Δ. Ties go to the first id in sorted order.
    """
    import pandas as pd

    data = scores[scores["model"].isin(MODELS)].copy()
    data["quality"] = pd.concat([data["keyword_recall"], data["rouge_l"], data["chrf"] / 100], axis=1).mean(axis=1)
    wide = data.pivot(index="id", columns="model", values=["quality", "refusal_accuracy"]).sort_index()
    kinds = data.drop_duplicates("id").set_index("id")["kind"].reindex(wide.index)
    table = pd.DataFrame({
        "kind": kinds,
        "quality_base": wide[("quality", "base")], "quality_tuned": wide[("quality", "tuned")],
        "refusal_gain": wide[("refusal_accuracy", "tuned")] - wide[("refusal_accuracy", "base")],
    })
    table["delta"] = table["quality_tuned"] - table["quality_base"]
    answerable = table[table["kind"] != "out_of_scope"]
    oos = table[table["kind"] == "out_of_scope"]
    picks = []
    if len(answerable):
        picks.append(("mejor mejora", answerable["delta"].idxmax()))
        picks.append(("peor empeoramiento", answerable["delta"].idxmin()))
    if len(oos):
        best = oos.sort_values(["refusal_gain", "delta"], ascending=False, kind="stable").index[0]
        picks.append(("fuera de alcance", best))
    rows = [{"caso": role, "id": rid, **table.loc[rid].to_dict()} for role, rid in picks]
    return pd.DataFrame(rows)


def example_html(prediction: dict, role: str, delta: float) -> str:
    """One picked example in full: question, reference and both answers, keywords highlighted."""
    keywords = prediction["keywords"]

    def block(title: str, text: str, extra: str = "") -> str:
        return (f"<p style='margin:0.3em 0'><b>{title}</b>{extra}</p><div style='white-space:pre-wrap;"
                f"border-left:3px solid #ccc;padding-left:0.6em'>{highlight_keywords(text, keywords)}</div>")

    def ending(name: str) -> str:
        tokens, stopped = prediction[f"tokens_{name}"], prediction[f"stopped_{name}"]
        return f" — {tokens} tokens, {'terminó con EOS' if stopped else 'cortada por max_new_tokens'}"

    head = (f"<h4>{html.escape(role.capitalize())}: {html.escape(prediction['id'])} "
            f"({html.escape(str(prediction['kind']))}, {html.escape(str(prediction['topic']))}; "
            f"Δ calidad = {delta:+.3f})</h4>")
    return (head + block("Pregunta", prediction["question"]) + block("Referencia", prediction["reference"])
            + block("Base", prediction["answer_base"], ending("base"))
            + block("Ajustado", prediction["answer_tuned"], ending("tuned")))


# --------------------------------------------------------------------------------------------
# Figures (drawn from the saved summaries)
# --------------------------------------------------------------------------------------------


def _bars(ax, labels: Sequence[str], summary, metric: str, models: Sequence[str] = MODELS, horizontal=False,
          annotate: bool = False):
    """Grouped bars with CI whiskers for ``models`` over ``labels`` (the ``group`` column or one bar)."""
    from utils.plotting import COLORS

    width = 0.8 / len(models)
    positions = np.arange(len(labels))
    ticks, names = [], []
    for k, model in enumerate(models):
        rows = summary[(summary["model"] == model) & (summary["metric"] == metric)]
        if "group" in rows:
            rows = rows.set_index("group").reindex(labels)
        value = rows["value"].to_numpy(dtype=float)
        err = np.vstack([value - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - value])
        offset = positions + (k - (len(models) - 1) / 2) * width
        kwargs = dict(color=COLORS.get(model), label=MODEL_LABELS.get(model, model), capsize=3)
        if horizontal:
            ax.barh(offset, value, height=width, xerr=err, **kwargs)
        else:
            ax.bar(offset, value, width=width, yerr=err, **kwargs)
            digits = 1 if metric in {"chrf", "length_tokens", "perplexity"} else 2
            ticks.extend(offset)
            names.extend(f"{v:.{digits}f}" for v in value)
    if annotate:  # the values under the bars: readable even when a bar has height 0
        ax.set_xticks(ticks, names, fontsize=8)
        ax.tick_params(axis="x", length=0)
        ax.grid(axis="x", visible=False)


def plot_metric_comparison(summary, confidence: float = 0.95):
    """One panel per metric: base vs tuned, with the bootstrap CI as whiskers."""
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if set(MODELS) <= set(summary.loc[summary["metric"] == m, "model"])]
    ncols = 5 if len(metrics) > 8 else 4
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.7 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _bars(ax, [""], summary, metric, annotate=True)
        label, higher = METRICS[metric]
        hint = "↑ mejor" if higher else "↓ mejor" if higher is False else "-- referencia"
        ax.set_title(f"{label}\n({hint})", fontsize=9)
        reference = summary[(summary["model"] == "reference") & (summary["metric"] == metric)]
        if higher is None and len(reference):
            ax.axhline(float(reference["value"].iloc[0]), color="black", linestyle="--", linewidth=1)
        if metric in {"keyword_recall", "rouge_l", "refusal_accuracy", "refusal_oos", "wrongful_refusal",
                      "stop_rate"}:
            ax.set_ylim(0, 1.05)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Modelo base vs ajustado en test (barras: IC bootstrap {confidence:.0%})", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot_metrics_by_group(by_group, metrics: Sequence[str] = ("keyword_recall", "chrf")):
    """Rows = metrics, columns = by kind / by topic: horizontal base vs tuned bars with CIs."""
    import matplotlib.pyplot as plt

    groupings = [g for g in ("kind", "topic") if g in set(by_group["group_by"])]
    sizes = {g: by_group.loc[by_group["group_by"] == g, "group"].nunique() for g in groupings}
    height = 0.32 * max(sizes.values()) + 1.4
    fig, axes = plt.subplots(len(metrics), len(groupings), squeeze=False,
                             figsize=(5.2 * len(groupings), height * len(metrics)),
                             gridspec_kw={"height_ratios": [1] * len(metrics)})
    titles = {"kind": "Por tipo de pregunta", "topic": "Por tema"}
    for row, metric in enumerate(metrics):
        for col, grouping in enumerate(groupings):
            ax = axes[row, col]
            data = by_group[by_group["group_by"] == grouping]
            labels = sorted(data["group"].unique())
            _bars(ax, labels, data, metric, horizontal=True)
            ax.set_yticks(np.arange(len(labels)), [KIND_LABELS.get(x, x) for x in labels], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(METRICS[metric][0])
            ax.set_title(titles[grouping], fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# --------------------------------------------------------------------------------------------
# Interactive use
# --------------------------------------------------------------------------------------------


def stream_answer(
    model,
    tokenizer,
    question: str,
    system_prompt: str | None = None,
    adapter: bool = True,
    max_new_tokens: int = 256,
) -> str:
    """Print a greedy answer token by token (``TextStreamer``) and return it; ``adapter=False`` = base."""
    from transformers import TextStreamer

    from utils.training import stop_token_ids

    chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(_model_device(model))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.eval()
    with adapter_state(model, adapter), torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def make_ask(model, tokenizer, system_prompt: str | None, max_new_tokens: int = 256) -> Callable[..., str]:
    """``ask("¿...?", adapter=True)``: stream an answer from the loaded model, adapter on or off."""

    def ask(question: str, adapter: bool = True, max_new_tokens: int = max_new_tokens) -> str:
        return stream_answer(model, tokenizer, question, system_prompt, adapter, max_new_tokens)

    return ask


# --------------------------------------------------------------------------------------------
# Export: merge the adapter into a 16-bit copy of the base model
# --------------------------------------------------------------------------------------------


def merge_dtype(name: str = "auto") -> torch.dtype:
    """16-bit dtype of the merged copy: "fp16", "bf16", or "auto" (fp16 when this machine's GPU has no
    bf16, as the RTX 2070 SUPER, so the exported model runs there; bf16 otherwise)."""
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"merge_dtype={name!r}: use 'auto', 'fp16' or 'bf16'.")
    from utils.modeling import gpu_supports_bf16

    return torch.float16 if torch.cuda.is_available() and not gpu_supports_bf16() else torch.bfloat16


def probe_logits(model, tokenizer, chats: Sequence[Sequence[dict]], adapter: bool = True) -> list[torch.Tensor]:
    """Float32 CPU logits of each full chat (the probe the merge check compares)."""
    device = _model_device(model)
    out = []
    model.eval()
    with adapter_state(model, adapter), torch.inference_mode():
        for chat in chats:
            enc = tokenizer.apply_chat_template(list(chat), return_tensors="pt", return_dict=True).to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare_logits(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> dict[str, float]:
    """Largest absolute logit difference and share of positions with the same top-1 token."""
    diffs = [float((x - y).abs().max()) for x, y in zip(a, b)]
    means = [float((x - y).abs().mean()) for x, y in zip(a, b)]
    same = [float((x.argmax(-1) == y.argmax(-1)).float().mean()) for x, y in zip(a, b)]
    scale = max(float(x.abs().max()) for x in a)
    return {"max_abs_diff": max(diffs), "mean_abs_diff": float(np.mean(means)), "max_abs_logit": scale,
            "top1_agreement": float(np.mean(same))}


def export_merged(
    adapter_dir: Path,
    model_name: str,
    out_dir: Path,
    probe_chats: Sequence[Sequence[dict]],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    rtol: float = 4.0,
    reference_logits: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Merge the adapter into an unquantised 16-bit base, save it with the tokenizer, check its logits.

    The base is reloaded unquantised because merging into 4-bit weights re-quantises the sum and
    shifts the outputs. The check compares, on ``probe_chats``, the adapter applied on the same 16-bit
    base (unmerged) with the merged copy **reloaded from disk**. Both carry 16-bit rounding, so the
    tolerance is in units of it: the check passes when the mean absolute logit difference is at most
    ``rtol × eps(dtype) × max |logit|`` (bf16 eps = 2⁻⁸, fp16 eps = 2⁻¹¹; a correct merge measures about
    1 unit), else it raises ``MergeCheckError``. ``reference_logits`` (the evaluated, possibly 4-bit,
    model) are compared too, for information: that gap is the quantisation error, not the merge's.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from utils.modeling import load_model

    quant = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    base = load_model(model_name, quantization=quant, device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    unmerged = probe_logits(peft_model, tokenizer, probe_chats)
    merged = peft_model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del merged, peft_model, base
    reloaded = load_model(str(out_dir), quantization=quant, device=device)
    check = compare_logits(unmerged, probe_logits(reloaded, tokenizer, probe_chats, adapter=True))
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    tolerance = rtol * torch.finfo(dtype).eps * check["max_abs_logit"]
    report: dict[str, Any] = {
        "folder": str(out_dir), "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "safetensors_gib": size / 1024**3, "rtol": rtol, "tolerance_mean_abs_diff": tolerance,
        "rounding_units": check["mean_abs_diff"] / (torch.finfo(dtype).eps * check["max_abs_logit"]),
        "probe_chats": len(probe_chats), "merged_vs_adapter": check,
        "passed": check["mean_abs_diff"] <= tolerance,
    }
    if reference_logits is not None:
        report["merged_vs_evaluated_model"] = compare_logits(list(reference_logits), probe_logits(
            reloaded, tokenizer, probe_chats, adapter=True))
    del reloaded
    (out_dir / "05_merge_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if not report["passed"]:
        raise MergeCheckError(
            f"the merged model in {out_dir} differs from the adapter model by {check['mean_abs_diff']:.3g} "
            f"on average in the logits ({report['rounding_units']:.1f} units of {report['dtype']} rounding; "
            f"tolerance merge_rtol={rtol}). Check that model_name={model_name!r} is the base the adapter "
            "was trained on (04_config.json) and that the adapter folder is complete."
        )
    return report


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


def _read_log_history(path: Path):
    """Loss curves of one ``04_log_history.csv``: rows (step, split, loss) for train and eval."""
    import pandas as pd

    history = pd.read_csv(path)
    parts = []
    for column, split in (("loss", "train"), ("eval_loss", "eval")):
        if column in history and "step" in history:
            data = history[["step", column]].dropna()
            parts.append(pd.DataFrame({"step": data["step"], "split": split, "loss": data[column]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "split", "loss"])


def collect_runs(root: Path = RUNS_DIR, only: Sequence[str] = ()):
    """Every run under ``root`` (or the folders named in ``only``): (metrics of each ``05_metrics.json``,
    loss curves of each ``04_log_history.csv``)."""
    import pandas as pd

    metrics, curves = [], []
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    for folder in [f for f in folders if not only or f.name in only]:
        if (folder / "05_metrics.json").is_file():
            data = json.loads((folder / "05_metrics.json").read_text(encoding="utf-8"))
            metrics.append(pd.DataFrame(data["metrics"]).assign(run=folder.name))
        if (folder / "04_log_history.csv").is_file():
            curves.append(_read_log_history(folder / "04_log_history.csv").assign(run=folder.name))
    metrics_df = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame()
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    return metrics_df, curves_df


def runs_table(metrics, model: str = "tuned"):
    """Runs side by side: rows = metrics, columns = runs, cells = value [low, high] of ``model``."""
    data = metrics[metrics["model"] == model].copy()
    data["cell"] = data.apply(lambda r: f"{r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]", axis=1)
    table = data.pivot(index="metric", columns="run", values="cell")
    table = table.reindex([m for m in METRICS if m in table.index])
    table.index = [METRICS[m][0] for m in table.index]
    return table.fillna("—").rename_axis("Métrica")


def plot_run_comparison(metrics, curves, bounded: Sequence[str] = (
        "keyword_recall", "rouge_l", "refusal_accuracy", "stop_rate")):
    """Left: training/eval loss curves of every run; right: tuned-model metrics (0-1) per run with CIs."""
    import matplotlib.pyplot as plt

    runs = sorted(set(metrics.get("run", [])) | set(curves.get("run", [])))
    colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (run, split), data in (curves.groupby(["run", "split"]) if len(curves) else []):
        left.plot(data["step"], data["loss"], color=colors[run], linestyle="-" if split == "train" else "--",
                  marker=None if split == "train" else "o", markersize=3,
                  label=f"{run} ({'entrenamiento' if split == 'train' else 'evaluación'})")
    left.set_xlabel("Paso de optimización")
    left.set_ylabel("Pérdida (nats/token)")
    left.set_title("Curvas de pérdida por corrida")
    if len(curves):
        left.legend(fontsize=7)
    tuned = metrics[(metrics["model"] == "tuned") & metrics["metric"].isin(bounded)] if len(metrics) else metrics
    width = 0.8 / max(len(runs), 1)
    positions = np.arange(len(bounded))
    for k, run in enumerate(runs):
        rows = tuned[tuned["run"] == run].set_index("metric").reindex(list(bounded)) if len(tuned) else None
        if rows is None or rows["value"].isna().all():
            continue
        value = rows["value"].to_numpy(dtype=float)
        err = np.vstack([value - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - value])
        right.bar(positions + (k - (len(runs) - 1) / 2) * width, value, width=width, yerr=err, capsize=3,
                  color=colors[run], label=run)
    right.set_xticks(positions, [METRICS[m][0] for m in bounded], rotation=20, ha="right", fontsize=8)
    right.set_ylim(0, 1.05)
    right.set_ylabel("Valor (modelo ajustado)")
    right.set_title("Métricas del modelo ajustado por corrida")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Findings in words
# --------------------------------------------------------------------------------------------


def describe_results(summary, confidence: float = 0.95) -> str:
    """Spanish Markdown bullets stating, metric by metric, whether tuning helped (and if the CI says so)."""
    get = summary.set_index(["model", "metric"])
    lines = []

    def verdict(metric: str) -> str:
        label, higher = METRICS[metric]
        base, tuned, delta = (get.loc[(m, metric)] for m in ("base", "tuned", "delta"))
        better = delta["value"] > 0 if higher else delta["value"] < 0
        sure = delta["low"] > 0 or delta["high"] < 0
        word = "mejora" if better else ("no cambia" if delta["value"] == 0 else "empeora")
        if higher is None:
            word = ("alarga las respuestas" if delta["value"] > 0 else "acorta las respuestas"
                    if delta["value"] < 0 else "no cambia la longitud")
            if ("reference", metric) in get.index:
                word += f" (referencia: {get.loc[('reference', metric), 'value']:.1f})"
        ci = (f"IC {confidence:.0%} de la diferencia [{delta['low']:+.3f}, {delta['high']:+.3f}]"
              + (", que excluye el 0" if sure else ", que incluye el 0: con este test la diferencia no es concluyente"))
        if delta["low"] == delta["high"] == delta["value"] == 0:
            ci = "el mismo valor por pregunta en ambos modelos"
        return (f"- **{label}**: base {base['value']:.3f}, ajustado {tuned['value']:.3f} → el ajuste "
                f"**{word}** ({ci}).")

    for metric in METRICS:
        if all((m, metric) in get.index for m in ("base", "tuned", "delta")):
            lines.append(verdict(metric))
    return "\n".join(lines)


def _training_facts(run: Path | None) -> str | None:
    """"N pasos (E épocas) sobre <modelo>" from a run's 04_config.json and 04_log_history.csv."""
    if run is None or not (Path(run) / "04_config.json").is_file():
        return None
    import pandas as pd

    config = json.loads((Path(run) / "04_config.json").read_text(encoding="utf-8"))
    steps = (config.get("parameters") or {}).get("max_steps")
    text = f"{steps} pasos de optimización" if steps else "el entrenamiento de la notebook 04"
    history = Path(run) / "04_log_history.csv"
    if history.is_file():
        epochs = pd.read_csv(history).get("epoch")
        if epochs is not None and epochs.notna().any():
            text += f" ({epochs.max():.2f} épocas)"
    from utils.modeling import ModelNotAvailableError, resolve_model

    try:
        label = resolve_model(config.get("model_name", "")).label
    except ModelNotAvailableError:
        label = config.get("model_name")
    return text + f" sobre {label}"


def acceptance_statement(summary, run: Path | None = None) -> str:
    """Plain statement (Spanish) of whether the tuned model beats the base on keyword recall and refusal
    accuracy, and, where it does not, what the numbers say about why (``run``: the 04 outputs)."""
    table = summary.set_index(["model", "metric"])
    get = table["value"]

    def pair(metric: str, fmt: str = ".3f") -> str:
        return f"{get[('base', metric)]:{fmt}} → {get[('tuned', metric)]:{fmt}}"

    parts, failed = [], []
    for metric in ("keyword_recall", "refusal_accuracy"):
        if ("delta", metric) not in get.index:
            continue
        label = METRICS[metric][0].lower()
        beats = get[("delta", metric)] > 0
        failed += [] if beats else [metric]
        low, high = table.loc[("delta", metric), ["low", "high"]]
        unsure = ", aunque el IC de la diferencia incluye el 0: no es concluyente" if low <= 0 <= high else ""
        parts.append(f"{'supera' if beats else '**no** supera'} al base en {label} ({pair(metric)}{unsure})")
    text = "El modelo ajustado " + " y ".join(parts) + "."
    reasons = []
    if "keyword_recall" in failed:
        if ("delta", "loss") in get.index and get[("delta", "loss")] >= 0:
            reasons.append(f"la pérdida de test no bajó ({pair('loss')} nats/token): el adaptador no aprendió las "
                           "respuestas de referencia")
        else:
            reasons.append(f"la pérdida de test bajó ({pair('loss')} nats/token), pero generando solo el modelo "
                           "todavía no da los datos de la referencia")
    if "refusal_accuracy" in failed and ("tuned", "refusal_oos") in get.index:
        reasons.append(
            f"en las preguntas fuera de alcance rechaza y deriva correctamente {pair('refusal_oos', '.0%')}, y en "
            f"las respondibles rechaza indebidamente {pair('wrongful_refusal', '.0%')}"
            + (": aprendió la fórmula «la normativa disponible no establece» pero la aplica también a preguntas "
               "que sí tienen respuesta" if get[("delta", "wrongful_refusal")] > 0 else "")
            + ("; y casi nunca termina derivando a la Secretaría Académica"
               if get[("tuned", "refusal_oos")] < 0.5 else "")
        )
    if failed and ("tuned", "stop_rate") in get.index and get[("tuned", "stop_rate")] < 0.5:
        reasons.append(f"el modelo ajustado termina con EOS sólo en el {get[('tuned', 'stop_rate')]:.0%} de las "
                       "respuestas: las cortadas por max_new_tokens pierden contenido")
    facts = _training_facts(run)
    if failed and facts:
        reasons.append(f"el adaptador viene de {facts}: más pasos o un modelo base más capaz son las "
                       "palancas a probar")
    if reasons:
        text += " Por qué, según los números: " + "; ".join(reasons) + "."
    return text
