"""Recipe sweep on the embedded model: which change makes the LoRA adapter generalise, measured on validation.

Each variant trains the embedded model from the demo profile's "04" block plus its own overrides, then answers
every question of a seeded validation split (new phrasings of taught facts, whole combined items, whole
out-of-scope items) and is scored with ``utils.evaluation.metrics`` (keyword recall per kind, correct and
wrongful refusals, stop rate) plus a share of the reference's norm numbers the answer repeats. Results go to
``results/04_recipe_sweep_cpu.json`` (one entry per variant, merged across invocations, with provenance).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python tools/recipe_sweep.py --variants demo,lr1e3_b4
    .venv/bin/python tools/recipe_sweep.py --list

The validation split is built here until ``dataset/utn_sample_validation.jsonl`` exists: the corpus records are
split with ``utils.data.corpus.split_records`` (train / validation / test; with its older two-way form, twice),
so the test questions are never seen. ``--before-ref`` names the commit whose corpus is "before part A" (fewer
phrasings): that variant trains only on the train questions that corpus already had, and is scored on the same
validation questions as every other variant.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on shared cores

from utils.data.corpus import CORPUS_FILE, corpus_records, load_corpus, split_records  # noqa: E402
from utils.data.records import answer_of, normalize_question, question_of, write_jsonl  # noqa: E402
from utils.evaluation.metrics import score_answer  # noqa: E402
from utils.files import read_json, save_json  # noqa: E402
from utils.inference import generate_answers, load_trained, prompt_of  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402
from utils.training.cli import profile_settings  # noqa: E402
from utils.training.run import train  # noqa: E402
from utils.training.settings import setting_names  # noqa: E402

DEFAULT_OUT = REPO / "results" / "04_recipe_sweep_cpu.json"
DEFAULT_WORK = Path("/tmp/recipe_sweep")
BEFORE_REF = "d533af8"  # the corpus before H-corpus part A (3-4 phrasings per fact, 1-2 per out-of-scope item)
NORM_PATTERN = re.compile(r"\b(?:ord\.?|ordenanza|disp\.?|disposicion|res\.?|resolucion)\s*(?:n[ºo°]\s*)?"
                          r"(\d+(?:/\d+)?)")
KINDS = ("fact", "combined", "out_of_scope")
KINDS_SECTIONS = ("facts", "combined", "out_of_scope")


@dataclass(frozen=True)
class Variant:
    """One recipe: training settings over the profile's "04" block, the corpus it trains on, its answers."""

    name: str
    note: str
    overrides: dict[str, Any] = field(default_factory=dict)
    corpus: str = "current"  # "current" | "before" (the corpus at --before-ref: fewer phrasings)
    answers: str = "full"  # "full" | "short" (train answers cut to their first sentence + the referral)


# Every variant sees 160 training examples (half the demo's 40 steps x 8) unless its note says otherwise, so the
# comparison is at equal compute: about 10 CPU-minutes of training each (5 minutes on 2 idle cores).
B4 = {"gradient_accumulation_steps": 4, "max_steps": 40, "warmup_steps": 2}
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("demo_lr", "the demo's lr 2e-4 and effective batch 8, 20 steps (r 32, alpha 64 as the thesis)",
            {"learning_rate": 2e-4, "gradient_accumulation_steps": 8, "max_steps": 20, "warmup_steps": 1}),
    Variant("lr1e3_b4", "lr 1e-3, effective batch 4, 40 steps (twice the updates of demo_lr)",
            {"learning_rate": 1e-3, **B4}),
    Variant("lr5e4_b4", "lr 5e-4, effective batch 4, 40 steps", {"learning_rate": 5e-4, **B4}),
    Variant("lr1e3_b4_r8", "as lr1e3_b4 with lora_r 8, alpha 16 (a quarter of the trainable parameters)",
            {"learning_rate": 1e-3, **B4, "lora_r": 8, "lora_alpha": 16}),
    Variant("lr1e3_b4_before", "as lr1e3_b4, trained on the corpus before part A (fewer phrasings)",
            {"learning_rate": 1e-3, **B4}, corpus="before"),
    Variant("lr1e3_b4_short", "as lr1e3_b4, train answers cut to their first sentence (+ the referral)",
            {"learning_rate": 1e-3, **B4}, answers="short"),
    Variant("lr1e3_b4_80", "as lr1e3_b4 with 80 steps (320 examples: the demo's compute)",
            {"learning_rate": 1e-3, "gradient_accumulation_steps": 4, "max_steps": 80, "warmup_steps": 4}),
)}


# --------------------------------------------------------------------------------------------
# Data: the seeded splits and the variants' training files
# --------------------------------------------------------------------------------------------


def build_splits(corpus_path: Path, seed: int, fraction: float) -> dict[str, list[dict]]:
    """Train / validation / test of the corpus with ``split_records`` (its three-way form when it has one).

    With the older two-way ``split_records`` the test split comes off first and validation from the rest.
    """
    records = corpus_records(load_corpus(corpus_path))
    splits = split_records(records, seed, fraction)
    if isinstance(splits, dict):
        return {name: list(splits[name]) for name in ("train", "validation", "test")}
    rest, test = splits
    train, validation = split_records(rest, seed, fraction)
    return {"train": train, "validation": validation, "test": test}


def questions_at(ref: str) -> set[str]:
    """Normalised questions of the "before" corpus: a YAML file, or the corpus at git commit ``ref``."""
    if Path(ref).is_file():
        text = Path(ref).read_text(encoding="utf-8")
    else:
        rel = CORPUS_FILE.relative_to(REPO).as_posix()
        text = subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    corpus = yaml.safe_load(text)
    return {normalize_question(q) for section in KINDS_SECTIONS for item in corpus.get(section) or []
            for q in item["questions"]}


def shorten_answer(text: str) -> str:
    """The first sentence of an answer, plus any later sentence that refers the student to an office."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-ZÁÉÍÓÚÑ¿¡])", text.strip())
    kept = sentences[:1] + [s for s in sentences[1:] if re.search(r"consult|suger", s, re.IGNORECASE)]
    return " ".join(kept)


def variant_train_records(variant: Variant, train: Sequence[dict], before_ref: str) -> list[dict]:
    """The training records of a variant: the train split, filtered to the old corpus or with short answers."""
    records = [dict(r, messages=[dict(m) for m in r["messages"]]) for r in train]
    if variant.corpus == "before":
        old = questions_at(before_ref)
        records = [r for r in records if normalize_question(question_of(r["messages"])) in old]
    if variant.answers == "short":
        for record in records:
            record["messages"][-1]["content"] = shorten_answer(answer_of(record["messages"]))
    return records


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def norm_numbers(text: str) -> set[str]:
    """Numbers of the norms cited in a text ("Ord. 1549" -> "1549", "Disp. 65/07" -> "65/07")."""
    plain = normalize_question(text.replace("/", " slash ")).replace(" slash ", "/")
    return set(NORM_PATTERN.findall(plain))


def norm_recall(answer: str, reference: str) -> float | None:
    """Share of the reference's cited norm numbers the answer repeats (None when the reference cites none)."""
    wanted = norm_numbers(reference)
    return None if not wanted else len(wanted & norm_numbers(answer)) / len(wanted)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none), rounded to 4 places."""
    kept = [v for v in values if v is not None and v == v]
    return round(sum(kept) / len(kept), 4) if kept else None


def score_answers(records: Sequence[dict], outputs: Sequence[dict]) -> dict[str, Any]:
    """Validation metrics of one model: keyword recall per kind, refusals, norm recall, stop rate, length."""
    rows = []
    for record, out in zip(records, outputs):
        reference = answer_of(record["messages"])
        scores = score_answer(out["answer"], reference, record["keywords"], record["kind"])
        rows.append({**scores, "kind": record["kind"], "norm_recall": norm_recall(out["answer"], reference),
                     "stopped": float(out["stopped"]), "n_tokens": out["n_tokens"]})
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in KINDS}
    answerable = by_kind["fact"] + by_kind["combined"]
    return {
        "keyword_recall_fact": mean([r["keyword_recall"] for r in by_kind["fact"]]),
        "keyword_recall_combined": mean([r["keyword_recall"] for r in by_kind["combined"]]),
        "keyword_recall_answerable": mean([r["keyword_recall"] for r in answerable]),
        "refusal_oos": mean([r["refusal_oos"] for r in by_kind["out_of_scope"]]),
        "wrongful_refusal": mean([r["wrongful_refusal"] for r in answerable]),
        "norm_recall": mean([r["norm_recall"] for r in answerable]),
        "rouge_l": mean([r["rouge_l"] for r in rows]),
        "stop_rate": mean([r["stopped"] for r in rows]),
        "mean_tokens": mean([r["n_tokens"] for r in rows]),
        "n": {k: len(v) for k, v in by_kind.items()},
    }


def sample_answers(records: Sequence[dict], outputs: Sequence[dict], per_kind: int = 2) -> list[dict]:
    """A few generated answers per kind (the first ones in validation order), for reading."""
    picked = []
    for kind in KINDS:
        pairs = [(r, o) for r, o in zip(records, outputs) if r["kind"] == kind][:per_kind]
        picked += [{"id": r["id"], "kind": kind, "question": question_of(r["messages"]),
                    "reference": answer_of(r["messages"]), "answer": o["answer"]} for r, o in pairs]
    return picked


# --------------------------------------------------------------------------------------------
# Running a variant
# --------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all its threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def evaluation_key() -> str:
    """The setting that names the evaluation file: ``validation_file`` once H-train lands it, else ``test_file``."""
    return "validation_file" if "validation_file" in setting_names() else "test_file"


def train_variant(variant: Variant, train_file: Path, validation_file: Path, out_dir: Path,
                  profile: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Train one variant: one checkpoint, one validation loss at the end (32 seeded validation examples)."""
    steps = int(variant.overrides.get("max_steps", profile_settings(profile).max_steps))
    overrides = {"eval_steps": steps, "eval_limit": 32, "per_device_eval_batch_size": 8, "eval_on_start": False,
                 "save_steps": steps, "save_total_limit": 1,
                 "logging_steps": 5, "resume": False, **extra, **variant.overrides,
                 "train_file": str(train_file), evaluation_key(): str(validation_file), "output_dir": str(out_dir)}
    settings = profile_settings(profile, **overrides)
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = train(settings, verbose=False)
    return {
        "settings": {k: getattr(settings, k) for k in ("learning_rate", "gradient_accumulation_steps",
                                                        "per_device_train_batch_size", "max_steps", "warmup_steps",
                                                        "lora_r", "lora_alpha", "lora_dropout", "lr_scheduler_type")},
        "train_wall_s": round(time.perf_counter() - wall, 1),
        "train_cpu_s": round(cpu_seconds() - cpu, 1),
        "loss": {k: result.get(k) for k in ("first_train_loss", "last_train_loss", "first_eval_loss",
                                            "last_eval_loss", "global_step", "tokens_per_second")},
    }


def answer_validation(run_dir: Path, validation: Sequence[dict], max_new_tokens: int,
                      adapter: bool = True) -> tuple[list[dict], dict[str, float]]:
    """Greedy answers of the trained run (or its base, ``adapter=False``) to every validation question."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    model, tokenizer = load_trained(run_dir, device="cpu")
    outputs = generate_answers(model, tokenizer, [prompt_of(r) for r in validation], max_new_tokens,
                               batch_size=16, adapter=adapter, progress=False)
    return outputs, {"eval_wall_s": round(time.perf_counter() - wall, 1),
                     "eval_cpu_s": round(cpu_seconds() - cpu, 1)}


def run_variant(variant: Variant, splits: dict[str, list[dict]], args: argparse.Namespace,
                results: dict[str, Any]) -> dict[str, Any]:
    """Train, answer and score one variant; the base model is scored too the first time a run exists."""
    work = args.work_dir / variant.name
    work.mkdir(parents=True, exist_ok=True)
    train_records = variant_train_records(variant, splits["train"], args.before_ref)
    train_file = write_jsonl(train_records, work / "train.jsonl")
    validation_file = args.work_dir / "validation.jsonl"
    print(f"[{variant.name}] {variant.note}; {len(train_records)} training examples", flush=True)
    entry = {"name": variant.name, "note": variant.note, "corpus": variant.corpus, "answers": variant.answers,
             "train_examples": len(train_records),
             **train_variant(variant, train_file, validation_file, work / "run", args.profile, args.extra)}
    outputs, timing = answer_validation(work / "run", splits["validation"], args.max_new_tokens)
    entry.update(timing, metrics=score_answers(splits["validation"], outputs),
                 samples=sample_answers(splits["validation"], outputs))
    if "base" not in results:
        base_outputs, base_timing = answer_validation(work / "run", splits["validation"], args.max_new_tokens,
                                                      adapter=False)
        results["base"] = {**base_timing, "metrics": score_answers(splits["validation"], base_outputs),
                           "samples": sample_answers(splits["validation"], base_outputs)}
    print(f"[{variant.name}] {entry['metrics']}", flush=True)
    return entry


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def machine_info(load_at_start: Sequence[float]) -> dict[str, Any]:
    """The CPU the numbers come from: cores, threads torch uses, load average at the variant's start and end."""
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in load_at_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def split_summary(splits: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of the seeded splits per kind, and how they were made."""
    return {"corpus": str(args.corpus), "seed": args.seed, "fraction": args.fraction,
            "sizes": {name: {k: sum(r["kind"] == k for r in recs) for k in KINDS} for name, recs in splits.items()},
            "validation_file": str(args.work_dir / "validation.jsonl")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options of the sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--profile", default="demo", help="profile whose 04 block the variants start from")
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fraction", type=float, default=0.12, help="share split off for test, then validation")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="git commit (or YAML file) of the 'before part A' corpus")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for every variant (its own values win), e.g. --set quantization=none")
    args = parser.parse_args(argv)
    args.extra = dict(parse_setting(text) for text in args.extra)
    return args


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--set``, the value read as YAML (``1e-3`` a float, ``false`` a bool)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"error: --set {text!r}: write KEY=VALUE, e.g. --set quantization=none")
    parsed = yaml.safe_load(value)
    return key.strip(), float(value) if isinstance(parsed, str) and re.fullmatch(r"[\d.]+e-?\d+", value) else parsed


def main(argv: list[str] | None = None) -> int:
    """Run the named variants, merging each result into ``--out`` as soon as it is measured."""
    args = parse_args(argv)
    if args.list:
        for variant in VARIANTS.values():
            print(f"{variant.name:18s} {variant.note}")
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    splits = build_splits(args.corpus, args.seed, args.fraction)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(splits["validation"], args.work_dir / "validation.jsonl")
    results = read_json(args.out) if args.out.is_file() else {}
    results.update(split=split_summary(splits, args), common_settings=args.extra)
    results.setdefault("variants", {})
    for name in names:
        load = os.getloadavg()
        entry = run_variant(VARIANTS[name], splits, args, results)
        results["variants"][name] = {**entry, "machine": machine_info(load), "provenance": result_provenance()}
        save_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
