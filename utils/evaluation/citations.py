r"""Citations and numbers of an answer in the UTN corpus style, and how well they match the reference's.

What is extracted, on text lower-cased and stripped of accents (``normalize_text``):

- **norms**: ordinances ("Ord. 1549", "Ordenanza Nº 710"), resolutions ("Res. 1234/15", "Resolución CS
  Nº 123/20", "Resolución Ministerial Nº 1232/01"), provisions ("Disp. 65/07", "Disposición Nº 65/07") and
  laws ("Ley 14.855"), each as ``(kind, number)``: kinds ``ord``, ``res``, ``disp``, ``ley``; thousands points
  dropped ("14.855" → "14855") and a four-digit year cut to two ("706/2022" → "706/22"), so either spelling
  matches. A bare "la 1549" counts as a norm only where the same text names that number with its kind;
- **articles**: "art. 7.2", "artículo 7", "arts. 1.1 a 1.4", "arts. 1.2 y 1.4"; a range whose ends differ
  only in their last part is expanded ("1.1 a 1.4" → 1.1, 1.2, 1.3, 1.4);
- **chapters**: "Capítulo 3", "cap. 3", "capítulos 1 y 2", roman numerals ("Capítulo III" → 3);
- **numbers**: every run of digits outside those citations ("200 horas", "30 días", "27/02/2004", "20%"),
  digits only: "doscientas" written in words is not read as 200, and "1.000" is read as 1000.

Scores of one answer against its reference (NaN where the reference gives nothing to check):

- ``citation_accuracy``: mean of the share of the reference's norms the answer cites and the share of its
  articles and chapters (*locators*) the answer cites; a part the reference lacks is left out. Partial
  credit: the right norm with a wrong article scores 0.5; one of the two norms of a combined answer, with
  its article, scores 0.5 (the pairing of an article with its norm is not checked);
- ``invented_citation``: 1 when the answer cites a norm, article or chapter that its reference does not
  contain (on every question, the out-of-scope ones included), else 0;
- ``number_match``: 1 when every number of the reference appears in the answer (anywhere, as a whole
  number: "20" does not match "200"), else 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from utils.evaluation.metrics import normalize_text

_NUM = r"(\d+(?:[./]\d+)*)"
_NUMBER_SIGN = r"(?:n(?:ro|o|°)?\.?\s*)?"  # "Nº" (normalised "no"), "N°", "nro."
_ISSUER = r"(?:(?:del?\s+)?(?:c\.?\s?s\.?|c\.?\s?d\.?|consejo superior|consejo directivo|ministerial|rectoral)\s*)?"
NORM_PATTERNS: dict[str, re.Pattern] = {
    "ord": re.compile(r"\bord(?:enanza)?s?\.?\s*(?:c\.?\s?s\.?\s*)?" + _NUMBER_SIGN + _NUM),
    "res": re.compile(r"\bres(?:olucion)?(?:es)?\.?\s*" + _ISSUER + _NUMBER_SIGN + _NUM),
    "disp": re.compile(r"\bdisp(?:osicion)?(?:es)?\.?\s*" + _NUMBER_SIGN + _NUM),
    "ley": re.compile(r"\bley(?:es)?\s*" + _NUMBER_SIGN + _NUM),
}
NORM_LABELS = {"ord": "Ord.", "res": "Res.", "disp": "Disp.", "ley": "Ley"}
_LIST = r"(\d+(?:\.\d+)*|[ivxl]+\b)((?:\s*(?:,|y|e|a|al|hasta|–|-)\s*(?:\d+(?:\.\d+)*|[ivxl]+\b))*)"
ARTICLE_PATTERN = re.compile(r"\bart(?:iculo)?s?\.?\s*(?=\d)" + _LIST)
CHAPTER_PATTERN = re.compile(r"\bcap(?:itulo)?s?\.?\s*(?=\d|[ivxl]+\b)" + _LIST)
_LIST_ITEM = re.compile(r"(,|\by\b|\be\b|\ba\b|\bal\b|\bhasta\b|–|-)?\s*(\d+(?:\.\d+)*|[ivxl]+\b)")
_BARE_NORM = re.compile(r"\b(?:la|las|de)\s+(\d{3,5})\b")
NUMBER_PATTERN = re.compile(r"(?<![\w.,/])\d+(?:[.,/]\d+)*")
_ROMAN = {"i": 1, "v": 5, "x": 10, "l": 50}
_RANGE_WORDS = {"a", "al", "hasta", "–", "-"}
_MAX_RANGE = 30  # a longer "range" is more likely two unrelated numbers than a list of articles


@dataclass(frozen=True)
class Citations:
    """What one text cites: norms as (kind, number), article and chapter numbers, and its other numbers."""

    norms: frozenset[tuple[str, str]] = frozenset()
    articles: frozenset[str] = frozenset()
    chapters: frozenset[str] = frozenset()
    numbers: frozenset[str] = frozenset()
    spans: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    @property
    def locators(self) -> frozenset[str]:
        """Articles and chapters as one set ("art 1.2", "cap 3")."""
        return frozenset({f"art {a}" for a in self.articles} | {f"cap {c}" for c in self.chapters})

    @property
    def any(self) -> bool:
        """Whether the text cites a norm, an article or a chapter."""
        return bool(self.norms or self.articles or self.chapters)


def roman_to_int(text: str) -> int | None:
    """"iii" → 3, "iv" → 4; None when ``text`` is not made of I, V, X, L."""
    values = [_ROMAN.get(ch) for ch in text.lower()]
    if not values or None in values:
        return None
    total = 0
    for k, value in enumerate(values):
        total += -value if k + 1 < len(values) and values[k + 1] > value else value
    return total


def normalize_norm_number(number: str) -> str:
    """"14.855" → "14855", "706/2022" → "706/22", "1234/15" unchanged: one spelling per norm."""
    head, _, year = number.partition("/")
    if re.fullmatch(r"\d{1,3}(?:\.\d{3})+", head):
        head = head.replace(".", "")
    if len(year) == 4 and year[:2] in {"19", "20"}:
        year = year[2:]
    return f"{head}/{year}" if year else head


def normalize_number(token: str) -> str:
    """A number as matched: thousands points dropped ("1.000" → "1000"), anything else as written."""
    return token.replace(".", "") if re.fullmatch(r"\d{1,3}(?:\.\d{3})+", token) else token


def _locator_value(token: str) -> str | None:
    """An article or chapter number: "1.2" as is, a roman numeral as its value, "01" as "1"."""
    if token[0].isdigit():
        return ".".join(str(int(part)) for part in token.split("."))
    value = roman_to_int(token)
    return str(value) if value else None


def _expand_range(start: str, end: str) -> list[str]:
    """"1.1".."1.4" → 1.1, 1.2, 1.3, 1.4 when only the last part differs (else both ends)."""
    a, b = start.split("."), end.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1] and 0 < int(b[-1]) - int(a[-1]) <= _MAX_RANGE:
        return [".".join(a[:-1] + [str(k)]) for k in range(int(a[-1]), int(b[-1]) + 1)]
    return [start, end]


def _locator_list(first: str, rest: str) -> list[str]:
    """The numbers of "1.1 a 1.4", "1.2 y 1.4", "3, 4 y 5" (ranges expanded)."""
    values: list[str] = []
    head = _locator_value(first)
    if head:
        values.append(head)
    for sep, token in _LIST_ITEM.findall(rest):
        value = _locator_value(token)
        if value is None:
            continue
        if sep in _RANGE_WORDS and values and value.count(".") == values[-1].count("."):
            values.extend(_expand_range(values.pop(), value))
        else:
            values.append(value)
    return values


def _find_norms(text: str) -> tuple[set[tuple[str, str]], list[tuple[int, int]]]:
    """Norms named with their kind, then bare "la 1549" where that number was named with its kind."""
    norms, spans = set(), []
    for kind, pattern in NORM_PATTERNS.items():
        for match in pattern.finditer(text):
            norms.add((kind, normalize_norm_number(match.group(1))))
            spans.append(match.span())
    kinds = {number: kind for kind, number in norms}
    for match in _BARE_NORM.finditer(text):
        if match.group(1) in kinds and not any(a <= match.start(1) < b for a, b in spans):
            spans.append(match.span(1))
    return norms, spans


def extract_citations(text: str) -> Citations:
    """Norms, articles, chapters and the other numbers of a text (see the module docstring)."""
    norm_text = normalize_text(text)
    norms, spans = _find_norms(norm_text)
    found: dict[str, set[str]] = {"art": set(), "cap": set()}
    for key, pattern in (("art", ARTICLE_PATTERN), ("cap", CHAPTER_PATTERN)):
        for match in pattern.finditer(norm_text):
            found[key].update(_locator_list(match.group(1), match.group(2)))
            spans.append(match.span())
    masked = list(norm_text)
    for start, end in spans:
        masked[start:end] = " " * (end - start)
    numbers = {normalize_number(n) for n in NUMBER_PATTERN.findall("".join(masked))}
    return Citations(frozenset(norms), frozenset(found["art"]), frozenset(found["cap"]), frozenset(numbers),
                     tuple(sorted(spans)))


def all_numbers(text: str) -> frozenset[str]:
    """Every number of a text, citations included (what a reference number is looked for in)."""
    return frozenset(normalize_number(n) for n in NUMBER_PATTERN.findall(normalize_text(text)))


def _share(expected: frozenset, given: frozenset) -> float:
    """Share of ``expected`` found in ``given`` (NaN when nothing is expected)."""
    return len(expected & given) / len(expected) if expected else math.nan


def citation_accuracy(answer: Citations, reference: Citations) -> float:
    """Mean of the norm share and the article/chapter share the answer cites (NaN: reference cites nothing)."""
    parts = [_share(reference.norms, answer.norms), _share(reference.locators, answer.locators)]
    parts = [p for p in parts if not math.isnan(p)]
    return sum(parts) / len(parts) if parts else math.nan


def invented_citations(answer: Citations, reference: Citations) -> list[str]:
    """Norms, articles and chapters the answer cites that the reference does not (readable, sorted)."""
    norms = [f"{NORM_LABELS[k]} {n}" for k, n in sorted(answer.norms - reference.norms)]
    locators = sorted(answer.locators - reference.locators)
    return norms + [loc.replace("art ", "art. ").replace("cap ", "cap. ") for loc in locators]


def number_match(answer_text: str, reference: Citations) -> float:
    """1 when every number of the reference appears in the answer, 0 when one is missing (NaN: none)."""
    if not reference.numbers:
        return math.nan
    return float(reference.numbers <= all_numbers(answer_text))


def score_citations(answer: str, reference: str) -> dict[str, float]:
    """The three citation and number scores of one answer (see the module docstring)."""
    ours, theirs = extract_citations(answer), extract_citations(reference)
    return {
        "citation_accuracy": citation_accuracy(ours, theirs),
        "invented_citation": float(bool(invented_citations(ours, theirs))),
        "number_match": number_match(answer, theirs),
    }
