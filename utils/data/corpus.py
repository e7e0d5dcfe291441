"""The shipped corpus: the question sources in YAML, their seeded train/validation/test split, the datasheet counts.

``build_dataset`` (``python -m utils.data build``) reads ``dataset/sources/utn_qa.yaml``, writes the three split
files and refreshes the generated counts block of ``dataset/README.md``. Validation drives every choice made
during training (evaluation, early stopping, hyperparameters); test is read only by notebook 05. Both hold the
same design: single new phrasings of taught facts, whole combined items, whole out-of-scope items.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

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
from utils.data.stats import count_table, verbatim_answer_table
from utils.files import atomic_write_text
from utils.paths import DATASET_DIR, TEST_FILE, TRAIN_FILE, VALIDATION_FILE

CORPUS_FILE = DATASET_DIR / "sources" / "utn_qa.yaml"
README_FILE = DATASET_DIR / "README.md"
COUNTS_START = "<!-- counts:start -->"
COUNTS_END = "<!-- counts:end -->"
DEFAULT_SEED = 42
DEFAULT_TEST_FRACTION = 0.12
DEFAULT_VALIDATION_FRACTION = 0.12  # the same design and about the same size as test
MIN_TRAIN_QUESTIONS_PER_FACT = 2
SPLITS = ("train", "validation", "test")
HELD_OUT = ("test", "validation")  # the order in which they take their items (ties go to test)

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
                                 "(they all stay in train; validation and test take only the ones beyond them)")
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


def record_item(record: dict) -> str:
    """The corpus item a record comes from (its id without the ``-q<n>`` suffix)."""
    return record["id"].rsplit("-q", 1)[0]


# --------------------------------------------------------------------------------------------
# The seeded split
# --------------------------------------------------------------------------------------------


def check_fractions(test_fraction: float, validation_fraction: float) -> None:
    """Raise ``ValueError`` naming the option unless both shares are in (0, 0.5) and train keeps the majority."""
    for name, share in (("test_fraction", test_fraction), ("validation_fraction", validation_fraction)):
        if not 0 < share < 0.5:
            raise ValueError(f"{name}={share}: use a share above 0 and below 0.5 (the shipped split uses "
                             f"{DEFAULT_TEST_FRACTION})")
    if test_fraction + validation_fraction > 0.5:
        raise ValueError(f"test_fraction + validation_fraction = {test_fraction + validation_fraction:g}: train "
                         "must keep at least half of the questions — lower one of them (e.g. 0.12 each)")


def _items_by_kind(records: Sequence[dict]) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """Records grouped by corpus item (in order), and item ids grouped by kind."""
    items: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        items[record_item(record)].append(record)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for item_id, item_records in items.items():
        by_kind[item_records[0]["kind"]].append(item_id)
    return items, by_kind


def _whole_items(items: dict[str, list[dict]], by_kind: dict[str, list[str]], shares: dict[str, float],
                 rng: random.Random) -> dict[str, str]:
    """Record id -> held-out split for the out-of-scope and combined items that leave train whole.

    Each held-out split takes its share of the items of each kind; one seeded sample per kind, test first.
    """
    assigned: dict[str, str] = {}
    for kind in ("out_of_scope", "combined"):
        pool = sorted(by_kind.get(kind, []))
        counts = {split: round(share * len(pool)) for split, share in shares.items()}
        picked = iter(rng.sample(pool, min(len(pool), sum(counts.values()))))
        for split, n_items in counts.items():
            for item_id in [next(picked) for _ in range(n_items)]:
                assigned.update((r["id"], split) for r in items[item_id])
    return assigned


def _fact_slots(items: dict[str, list[dict]], facts: list[str], rng: random.Random) -> list[tuple[float, str]]:
    """Fact items in the order they give a question to a held-out split, topics in proportion to their size.

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


def _fill_with_facts(items: dict[str, list[dict]], facts: list[str], assigned: dict[str, str],
                     targets: dict[str, int], rng: random.Random) -> None:
    """Give single fact questions to the held-out splits until each reaches its target size.

    Each slot goes to the split whose fact part holds the smaller share of its size in that slot's topic, then
    overall (ties: test), so both draw on every topic and on the first round of facts alike. A split asks a
    fact a second time only when the facts it does not ask yet have no spare question left.
    """
    filled = Counter(assigned.values())
    wanted = {split: max(0, targets[split] - filled[split]) for split in targets}
    taken: Counter = Counter()
    asked: set[tuple[str, str]] = set()  # (split, fact)
    skipped: list[str] = []
    for repeat, slots in ((False, [f for _, f in _fact_slots(items, facts, rng)]), (True, skipped)):
        for fact in list(slots):
            open_splits = [s for s in targets if taken[s] < wanted[s] and (repeat or (s, fact) not in asked)]
            if not open_splits:
                skipped.append(fact)
                continue
            topic = items[fact][0]["topic"]
            split = min(open_splits, key=lambda s: (taken[s, topic] / wanted[s], taken[s] / wanted[s]))
            candidates = [r["id"] for r in items[fact] if r["id"] not in assigned]
            assigned[rng.choice(candidates)] = split
            taken[split] += 1
            taken[split, topic] += 1
            asked.add((split, fact))


def _separate(records: Sequence[dict], assigned: dict[str, str]) -> dict[str, list[dict]]:
    """The three splits in corpus order; a held-out record whose facts train does not teach goes back to train."""
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for record in records:
        splits[assigned.get(record["id"], "train")].append(record)
    taught = {f for r in splits["train"] for f in r["facts"]}
    for split in HELD_OUT:
        kept = [r for r in splits[split] if all(f in taught for f in r["facts"])]
        # a combined item whose fact has no question left in train stays in train
        splits["train"] += [r for r in splits[split] if r not in kept]
        splits[split] = kept
    order = {r["id"]: k for k, r in enumerate(records)}
    splits["train"].sort(key=lambda r: order[r["id"]])
    return splits


def split_records(records: Sequence[dict], seed: int = DEFAULT_SEED, test_fraction: float = DEFAULT_TEST_FRACTION,
                  validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> dict[str, list[dict]]:
    """Seeded train/validation/test split of corpus records: ``{"train": [...], "validation": [...], "test": [...]}``.

    Validation and test have the same design. Out-of-scope and combined items go to one of them whole (a
    combined one only when all its facts are taught in train); fact items give single questions while keeping
    at least ``MIN_TRAIN_QUESTIONS_PER_FACT`` in train, dealt round-robin over topics. Each held-out split
    is about its fraction of all questions; no question wording is in two splits.
    """
    check_fractions(test_fraction, validation_fraction)
    rng = random.Random(seed)
    items, by_kind = _items_by_kind(records)
    shares = {"test": test_fraction, "validation": validation_fraction}
    assigned = _whole_items(items, by_kind, shares, rng)
    targets = {split: round(share * len(records)) for split, share in shares.items()}
    _fill_with_facts(items, sorted(by_kind.get("fact", [])), assigned, targets, rng)
    splits = _separate(records, assigned)
    check_split(splits)
    return splits


def check_split(splits: Mapping[str, Sequence[dict]]) -> None:
    """Raise ``DatasetError`` if a normalised wording is in two splits or a held-out record's fact is not taught.

    ``splits`` maps split names to records; ``"train"`` is the one that teaches. Every pair of splits is checked.
    """
    first: dict[str, tuple[str, str]] = {}  # normalised question -> (split, id) where it was first seen
    problems = []
    for name, records in splits.items():
        for record in records:
            key = normalize_question(question_of(record["messages"]))
            where = first.setdefault(key, (name, record["id"]))
            if where[0] != name:
                problems.append(f"{name} {record['id']} has the wording of {where[0]} {where[1]} ({key!r})")
    taught = {f for r in splits.get("train", ()) for f in r["facts"]}
    for name, records in splits.items():
        for record in records if name != "train" else ():
            for fact in record["facts"]:
                if fact not in taught:
                    problems.append(f"{name} {record['id']} asks about fact {fact}, which no train example teaches")
    if problems:
        raise DatasetError("the split leaks or holds out untaught facts:\n" + "\n".join(f"  {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# The datasheet counts and the build
# --------------------------------------------------------------------------------------------


def _markdown_table(table: Any, by: str, cell: Any = lambda v: str(int(v))) -> list[str]:
    """A pandas table as Markdown rows, index values in code font and the total in bold."""
    lines = [f"| {by} | " + " | ".join(table.columns) + " |", "|---" + "|---:" * len(table.columns) + "|"]
    for index, row in table.iterrows():
        cells = " | ".join(cell(v) for v in row)
        lines.append(f"| {'**total**' if index == 'total' else f'`{index}`'} | {cells} |")
    return lines + [""]


def _questions_per_item(splits: Mapping[str, Sequence[dict]]) -> str:
    """``"`fact` 6 (105 items), ..."``: the range of questions per corpus item, by kind."""
    sizes: dict[str, Counter] = defaultdict(Counter)
    for records in splits.values():
        for record in records:
            sizes[record["kind"]][record_item(record)] += 1
    parts = []
    for kind in _SECTIONS.values():
        counts = sorted(sizes[kind].values())
        if counts:
            spread = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}–{counts[-1]}"
            parts.append(f"`{kind}` {spread} ({len(counts)} items)")
    return ", ".join(parts)


def counts_markdown(splits: Mapping[str, Sequence[dict]], seed: int, test_fraction: float,
                    validation_fraction: float) -> str:
    """The generated counts block of ``dataset/README.md``: per split, kind and topic, and the verbatim answers."""
    total = sum(len(records) for records in splits.values())
    files = {"train": TRAIN_FILE.name, "validation": VALIDATION_FILE.name, "test": TEST_FILE.name}
    lines = [
        f"Generated by `python -m utils.data build --seed {seed} --test-fraction {test_fraction} "
        f"--validation-fraction {validation_fraction}` from `dataset/sources/{CORPUS_FILE.name}`; "
        "do not edit by hand.",
        "",
    ]
    lines += [f"- `{files.get(name, name)}`: {len(records)} examples ({len(records) / total:.1%} of {total})"
              for name, records in splits.items()]
    lines += ["", "Questions per corpus item: " + _questions_per_item(splits) + ".", ""]
    for by in ("kind", "topic"):
        lines += _markdown_table(count_table(splits, by), by)
    verbatim = verbatim_answer_table(splits)
    lines += [
        "Held-out answers that are also, word for word, the answer of a train example (by design for `fact`: "
        "a fact item keeps its answer and changes only the question, so these examples measure a new phrasing "
        "of a taught fact; a low loss or a high ROUGE on them is partly recall of a trained answer):",
        "",
    ]
    lines += _markdown_table(verbatim, "kind", cell=str)
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
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    validation_path: str | Path = VALIDATION_FILE,
) -> dict[str, Any]:
    """Write the three split files from the corpus YAML and refresh the README counts; return a summary.

    The summary holds, per split, its size (``train``, ``validation``, ``test``), its share of all questions
    (``<split>_share``) and its path (``<split>_path``), plus ``readme_updated``.
    """
    corpus = load_corpus(corpus_path)
    records = corpus_records(corpus)
    splits = split_records(records, seed, test_fraction, validation_fraction)
    paths = {"train": train_path, "validation": validation_path, "test": test_path}
    for name in SPLITS:
        write_jsonl(splits[name], paths[name])
    block = counts_markdown(splits, seed, test_fraction, validation_fraction)
    counts_updated = update_counts_block(Path(readme), block) if readme is not None else False
    summary: dict[str, Any] = {"readme_updated": counts_updated}
    for name in SPLITS:
        summary.update({name: len(splits[name]), f"{name}_share": len(splits[name]) / len(records),
                        f"{name}_path": str(paths[name])})
    return summary
