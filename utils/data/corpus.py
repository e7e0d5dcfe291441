"""The shipped corpus: the question sources in YAML, their seeded train/test split, and the datasheet counts.

``build_dataset`` (``python -m utils.data build``) reads ``dataset/sources/utn_qa.yaml``, writes the two split
files and refreshes the generated counts block of ``dataset/README.md``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.data.records import (
    ASSISTANT,
    OUT_OF_SCOPE_SOURCE,
    SYSTEM,
    USER,
    DatasetError,
    normalize_question,
    question_of,
    write_jsonl,
)
from utils.data.stats import count_table
from utils.files import atomic_write_text
from utils.paths import DATASET_DIR, TEST_FILE, TRAIN_FILE

CORPUS_FILE = DATASET_DIR / "sources" / "utn_qa.yaml"
README_FILE = DATASET_DIR / "README.md"
COUNTS_START = "<!-- counts:start -->"
COUNTS_END = "<!-- counts:end -->"
DEFAULT_SEED = 42
DEFAULT_TEST_FRACTION = 0.12
MIN_TRAIN_QUESTIONS_PER_FACT = 2

_SECTIONS = {"facts": "fact", "combined": "combined", "out_of_scope": "out_of_scope"}


# --------------------------------------------------------------------------------------------
# Reading and checking the corpus
# --------------------------------------------------------------------------------------------


@dataclass
class _CorpusChecker:
    """Checks the corpus item by item, collecting every problem (labelled by section, index and id)."""

    fact_ids: set
    problems: list[str] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    seen_questions: dict[str, str] = field(default_factory=dict)  # normalised question -> item id

    def check_section(self, section: str, items: Any) -> None:
        if not isinstance(items, list):
            self.problems.append(f"{section}: must be a list of items")
            return
        for k, item in enumerate(items):
            if not isinstance(item, dict):
                self.problems.append(f"{section}[{k}]: not a mapping")
                continue
            self._check_item(section, f"{section}[{k}] ({item.get('id')})", item)

    def _check_item(self, section: str, label: str, item: dict) -> None:
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            self.problems.append(f"{label}: missing id")
        elif item_id in self.seen_ids:
            self.problems.append(f"{label}: id {item_id} used twice — ids must be unique")
        self.seen_ids.add(item_id)
        for key in ("topic", "answer"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                self.problems.append(f"{label}: missing or empty {key!r}")
        self._check_keywords(label, item)
        questions = item.get("questions")
        if not isinstance(questions, list) or not questions:
            self.problems.append(f"{label}: 'questions' must be a non-empty list")
            return
        self._check_questions(label, str(item_id), questions)
        if section == "facts":
            self._check_fact(label, item, questions)
        if section == "combined":
            self._check_combined(label, item)

    def _check_keywords(self, label: str, item: dict) -> None:
        """Keywords are a non-empty list, each one present in the item's own answer."""
        keywords = item.get("keywords")
        if not isinstance(keywords, list) or not keywords or not all(isinstance(w, str) for w in keywords):
            self.problems.append(f"{label}: 'keywords' must be a non-empty list of strings")
        elif isinstance(item.get("answer"), str):
            answer = normalize_question(item["answer"])
            for word in keywords:
                if normalize_question(word) not in answer:
                    self.problems.append(f"{label}: keyword {word!r} is not in its own answer — the keyword "
                                         "score would fail the reference itself; fix the keyword or the answer")

    def _check_questions(self, label: str, item_id: str, questions: list) -> None:
        """No empty question, and no wording repeated anywhere in the corpus once normalised."""
        for question in questions:
            if not isinstance(question, str) or not question.strip():
                self.problems.append(f"{label}: empty question")
                continue
            key = normalize_question(question)
            if key in self.seen_questions:
                self.problems.append(f"{label}: question {question!r} repeats one of {self.seen_questions[key]} "
                                     "once normalised (case, accents, punctuation) — reword or drop it")
            self.seen_questions.setdefault(key, item_id)

    def _check_fact(self, label: str, item: dict, questions: list) -> None:
        if len(questions) < MIN_TRAIN_QUESTIONS_PER_FACT:
            self.problems.append(f"{label}: a fact needs at least {MIN_TRAIN_QUESTIONS_PER_FACT} questions "
                                 "(they all stay in train)")
        if not isinstance(item.get("source"), str) or not item["source"].strip():
            self.problems.append(f"{label}: missing 'source' (the norm and article)")

    def _check_combined(self, label: str, item: dict) -> None:
        facts = item.get("facts")
        if not isinstance(facts, list) or len(facts) < 2:
            self.problems.append(f"{label}: 'facts' must list at least two fact ids")
            return
        for fact in facts:
            if fact not in self.fact_ids:
                self.problems.append(f"{label}: fact {fact!r} is not an id under 'facts'")


def _read_corpus_yaml(path: Path) -> dict:
    """The parsed YAML of the corpus; ``DatasetError`` when it is missing or not valid YAML."""
    if not path.is_file():
        raise DatasetError(f"{path}: corpus not found — the build reads the question sources from this YAML")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc}) — fix the file's syntax") from None


def load_corpus(path: str | Path = CORPUS_FILE) -> dict:
    """Read the corpus YAML and check it whole; ``DatasetError`` lists every problem by item id."""
    path = Path(path)
    corpus = _read_corpus_yaml(path)
    problems: list[str] = []
    if not isinstance(corpus.get("system_prompt"), str) or not corpus["system_prompt"].strip():
        problems.append("system_prompt: missing or empty — give the one system prompt (in Spanish)")
    fact_ids = {item.get("id") for item in corpus.get("facts") or [] if isinstance(item, dict)}
    checker = _CorpusChecker(fact_ids, problems)
    for section in _SECTIONS:
        checker.check_section(section, corpus.get(section) or [])
    if problems:
        raise DatasetError(f"{path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems))
    return corpus


def corpus_records(corpus: dict) -> list[dict]:
    """One canonical record per question of the corpus (id ``<item>-q<n>``), in corpus order."""
    system = corpus["system_prompt"].strip()
    facts = {item["id"]: item for item in corpus.get("facts") or []}
    records = []
    for section, kind in _SECTIONS.items():
        for item in corpus.get(section) or []:
            if kind == "fact":
                fact_ids, source = [item["id"]], item["source"]
            elif kind == "combined":
                fact_ids = list(item["facts"])
                source = item.get("source") or "; ".join(dict.fromkeys(facts[f]["source"] for f in fact_ids))
            else:
                fact_ids, source = [], item.get("source") or OUT_OF_SCOPE_SOURCE
            for n, question in enumerate(item["questions"], 1):
                records.append({
                    "id": f"{item['id']}-q{n}",
                    "messages": [
                        {"role": SYSTEM, "content": system},
                        {"role": USER, "content": question.strip()},
                        {"role": ASSISTANT, "content": item["answer"].strip()},
                    ],
                    "source": source,
                    "topic": item["topic"],
                    "kind": kind,
                    "keywords": list(item["keywords"]),
                    "facts": fact_ids,
                })
    return records


def _item_id(record: dict) -> str:
    """The corpus item a record comes from (its id without the ``-q<n>`` suffix)."""
    return record["id"].rsplit("-q", 1)[0]


# --------------------------------------------------------------------------------------------
# The seeded split
# --------------------------------------------------------------------------------------------


def _items_by_kind(records: Sequence[dict]) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """Records grouped by corpus item (in order), and item ids grouped by kind."""
    items: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        items[_item_id(record)].append(record)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for item_id, item_records in items.items():
        by_kind[item_records[0]["kind"]].append(item_id)
    return items, by_kind


def _whole_items_for_test(items: dict[str, list[dict]], by_kind: dict[str, list[str]], test_fraction: float,
                          rng: random.Random) -> set[str]:
    """Record ids of the out-of-scope and combined items that go to test whole (the same share as overall)."""
    test_ids: set[str] = set()
    for kind in ("out_of_scope", "combined"):
        pool = sorted(by_kind.get(kind, []))
        n_items = round(test_fraction * len(pool))
        for item_id in rng.sample(pool, n_items):
            test_ids.update(r["id"] for r in items[item_id])
    return test_ids


def _fact_slots(items: dict[str, list[dict]], facts: list[str], rng: random.Random) -> list[tuple[float, str]]:
    """Fact items in the order they give a question to test, topics in proportion to their size.

    One question per fact per round; systematic sampling: the k-th pick of a topic with n questions sorts at
    (k + u) / n. A fact gives at most its questions beyond ``MIN_TRAIN_QUESTIONS_PER_FACT``.
    """
    topics: dict[str, list[str]] = defaultdict(list)
    for fact in facts:
        topics[items[fact][0]["topic"]].append(fact)
    slots: list[tuple[float, str]] = []
    for topic in sorted(topics):
        group = list(topics[topic])
        rng.shuffle(group)
        size = sum(len(items[f]) for f in group)
        spare = {f: len(items[f]) - MIN_TRAIN_QUESTIONS_PER_FACT for f in group}
        picks = [f for round_ in range(max(spare.values(), default=0)) for f in group if spare[f] > round_]
        slots.extend(((k + rng.random()) / size, fact) for k, fact in enumerate(picks))
    slots.sort()
    return slots


def _separate(records: Sequence[dict], test_ids: set[str]) -> tuple[list[dict], list[dict]]:
    """Train and test in corpus order; a test record whose facts train no longer teaches goes back to train."""
    train = [r for r in records if r["id"] not in test_ids]
    test = [r for r in records if r["id"] in test_ids]
    taught = {f for r in train for f in r["facts"]}
    for record in test:
        missing = [f for f in record["facts"] if f not in taught]
        if missing:  # a combined item whose fact has no question left in train: keep it in train
            train.append(record)
    test = [r for r in test if all(f in taught for f in r["facts"])]
    order = {r["id"]: k for k, r in enumerate(records)}
    train.sort(key=lambda r: order[r["id"]])
    return train, test


def split_records(records: Sequence[dict], seed: int = DEFAULT_SEED,
                  test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[list[dict], list[dict]]:
    """Seeded train/test split of corpus records; no question wording in both splits.

    Out-of-scope and combined items go to test whole (a combined one only when all its facts are
    taught in train); fact items give single questions to test while keeping at least
    ``MIN_TRAIN_QUESTIONS_PER_FACT`` in train, chosen round-robin over topics. Test is about
    ``test_fraction`` of all questions.
    """
    if not 0 < test_fraction < 0.5:
        raise ValueError(f"test_fraction={test_fraction}: use a share between 0 and 0.5 (e.g. 0.12)")
    rng = random.Random(seed)
    items, by_kind = _items_by_kind(records)
    target = round(test_fraction * len(records))
    test_ids = _whole_items_for_test(items, by_kind, test_fraction, rng)
    # Fact items fill the rest, one question each.
    slots = _fact_slots(items, sorted(by_kind.get("fact", [])), rng)
    for _, fact in slots[: max(0, target - len(test_ids))]:
        candidates = [r["id"] for r in items[fact] if r["id"] not in test_ids]
        test_ids.add(rng.choice(candidates))
    train, test = _separate(records, test_ids)
    check_split(train, test)
    return train, test


def check_split(train: Sequence[dict], test: Sequence[dict]) -> None:
    """Raise ``DatasetError`` if a test question's normalised wording is in train or a test fact is not taught."""
    train_questions = {normalize_question(question_of(r["messages"])): r["id"] for r in train}
    taught = {f for r in train for f in r["facts"]}
    problems = []
    for record in test:
        key = normalize_question(question_of(record["messages"]))
        if key in train_questions:
            problems.append(f"test {record['id']} has the wording of train {train_questions[key]} ({key!r})")
        for fact in record["facts"]:
            if fact not in taught:
                problems.append(f"test {record['id']} asks about fact {fact}, which no train example teaches")
    if problems:
        raise DatasetError("the split leaks or tests untaught facts:\n" + "\n".join(f"  {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# The datasheet counts and the build
# --------------------------------------------------------------------------------------------


def counts_markdown(train: Sequence[dict], test: Sequence[dict], seed: int, test_fraction: float) -> str:
    """The generated counts block of ``dataset/README.md`` (per split, kind and topic)."""
    splits = {"train": train, "test": test}
    total = len(train) + len(test)
    lines = [
        f"Generated by `python -m utils.data build --seed {seed} --test-fraction {test_fraction}` "
        f"from `dataset/sources/{CORPUS_FILE.name}`; do not edit by hand.",
        "",
        f"- `{TRAIN_FILE.name}`: {len(train)} examples",
        f"- `{TEST_FILE.name}`: {len(test)} examples ({len(test) / total:.1%} of {total})",
        "",
    ]
    for by in ("kind", "topic"):
        table = count_table(splits, by)
        lines.append(f"| {by} | " + " | ".join(table.columns) + " |")
        lines.append("|---" + "|---:" * len(table.columns) + "|")
        for index, row in table.iterrows():
            cells = " | ".join(str(int(v)) for v in row)
            lines.append(f"| {'**total**' if index == 'total' else f'`{index}`'} | {cells} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update_counts_block(readme: Path, block: str) -> bool:
    """Replace the text between the counts markers of ``readme``; False when the markers are absent."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(COUNTS_START), text.find(COUNTS_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(COUNTS_START)] + "\n" + block + text[end:]
    if new != text:
        atomic_write_text(readme, new)
    return True


def build_dataset(
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    corpus_path: str | Path = CORPUS_FILE,
    train_path: str | Path = TRAIN_FILE,
    test_path: str | Path = TEST_FILE,
    readme: str | Path | None = README_FILE,
) -> dict[str, Any]:
    """Write the two split files from the corpus YAML and refresh the README counts; return a summary."""
    corpus = load_corpus(corpus_path)
    records = corpus_records(corpus)
    train, test = split_records(records, seed, test_fraction)
    write_jsonl(train, train_path)
    write_jsonl(test, test_path)
    counts_updated = update_counts_block(Path(readme), counts_markdown(train, test, seed, test_fraction)) \
        if readme is not None else False
    return {"train": len(train), "test": len(test), "test_share": len(test) / len(records),
            "train_path": str(train_path), "test_path": str(test_path), "readme_updated": counts_updated}

