"""Records of the dataset: the two JSONL formats, the Llama-3 text layout, and the datasets TRL trains on.

A record is a dict with the keys of ``RECORD_KEYS``; ``messages`` is the chat (system, user, assistant).
The original format holds the whole chat in one ``text`` string, laid out as a ``TextLayout``.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from datasets import Dataset
from trl.data_utils import common_prefix_length

from utils.files import atomic_write_text

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
KINDS = ("fact", "combined", "out_of_scope")
# Metadata given to records read from files that carry none (the original text format).
DEFAULT_TOPIC = "sin_tema"
DEFAULT_KIND = "sin_tipo"
_PLACEHOLDERS = {"topic": DEFAULT_TOPIC, "kind": DEFAULT_KIND}
# Out-of-scope questions are answered by no norm of the corpus.
OUT_OF_SCOPE_SOURCE = "ninguna (fuera de alcance)"
RECORD_KEYS = ("id", "messages", "source", "topic", "kind", "keywords", "facts")

BOT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_KNOWN_MARKERS = frozenset({BOT, START_HEADER, END_HEADER, EOT})
# Special tokens of the Llama-3 and SmolLM2 (ChatML) chat templates: in a turn's content they would open or
# close a turn in training (a fake turn, an early stop), so the validator refuses them.
SPECIAL_TOKENS = (BOT, START_HEADER, END_HEADER, EOT, "<|finetune_right_pad_id|>", "<|im_start|>", "<|im_end|>",
                  "<|endoftext|>")

# One piece of a chat string: ("marker" | "text", its value, its start character).
Piece = tuple[str, str, int]


class DatasetError(ValueError):
    """A dataset file or corpus that cannot be used; the message lists every problem found."""


# --------------------------------------------------------------------------------------------
# Record access
# --------------------------------------------------------------------------------------------


def normalize_question(text: str) -> str:
    """Lowercase, strip accents, drop punctuation and collapse spaces (the key for duplicates)."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    no_accents = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    no_punct = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in no_accents)
    return " ".join(no_punct.split())


def _last_turn(messages: Sequence[dict], role: str) -> str:
    """Content of the last turn of ``role`` ("" when there is none)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == role:
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def question_of(messages: Sequence[dict]) -> str:
    """The question of a chat: the content of its last user turn ("" when there is none)."""
    return _last_turn(messages, USER)


def answer_of(messages: Sequence[dict]) -> str:
    """The reference answer of a chat: the content of its last assistant turn."""
    return _last_turn(messages, ASSISTANT)


def has_field(record: dict, name: str) -> bool:
    """Whether ``record`` carries a real value of ``name`` (not absent, empty or a placeholder of the loader).

    ``load_records`` fills ``topic`` / ``kind`` with ``DEFAULT_TOPIC`` / ``DEFAULT_KIND`` and ``keywords`` /
    ``facts`` with ``[]`` when a file carries none; those count as absent. An out-of-scope record's empty
    ``facts`` is its real value (it rests on no fact).
    """
    value = record.get(name)
    if value is None or value == "" or value == [] or value == _PLACEHOLDERS.get(name):
        return name == "facts" and value == [] and record.get("kind") == "out_of_scope"
    return True


def missing_fields(records: Sequence[dict], fields: Sequence[str]) -> list[str]:
    """The names in ``fields`` (in that order) that at least one record lacks (see ``has_field``).

    Consumers check before a metric or figure that needs ``keywords``, ``kind`` or ``topic``, and skip it with
    a message instead of showing NaN; ``python -m utils.data annotate`` adds the fields from a small CSV.
    """
    return [name for name in fields if any(not has_field(record, name) for record in records)]


def special_tokens_in(text: str, tokens: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
    """The chat-template special tokens (``SPECIAL_TOKENS`` or ``tokens``) that ``text`` contains, in order."""
    return [token for token in dict.fromkeys(tokens) if token and token in text]


def has_system_message(record: dict) -> bool:
    """Whether a record's chat holds a system turn."""
    return any(isinstance(m, dict) and m.get("role") == SYSTEM for m in record["messages"])


def system_prompt_policy(records: Sequence[dict]) -> str | None:
    """The dataset's system prompt: its most common system message (None when no record has one)."""
    prompts = Counter(m["content"] for r in records for m in r["messages"] if m.get("role") == SYSTEM)
    return prompts.most_common(1)[0][0] if prompts else None


def apply_system_prompt(records: Sequence[dict], policy: str | None) -> tuple[list[dict], list[str]]:
    """Records where each chat without a system turn gets ``policy`` as its first turn, and notes saying so.

    Without it the chat template adds the model's hidden default (SmolLM2: "You are a helpful AI assistant
    named SmolLM…"), so those examples would train or be answered under a prompt the dataset never shows.
    ``policy`` is the dataset's system prompt (``system_prompt_policy``); the input records are not changed.
    """
    missing = [r for r in records if not has_system_message(r)]
    if not missing:
        return list(records), []
    if policy is None:
        return list(records), [f"{len(missing)} records have no system message and the dataset has none: the "
                               "chat template's default system prompt applies to them"]
    system = {"role": SYSTEM, "content": policy}
    out = [r if has_system_message(r) else {**r, "messages": [system, *r["messages"]]} for r in records]
    shown = policy if len(policy) <= 60 else policy[:57] + "..."
    return out, [f"{len(missing)} records had no system message; the dataset's system prompt was added "
                 f"({shown!r}; first ids: {', '.join(str(r['id']) for r in missing[:10])})"]


# --------------------------------------------------------------------------------------------
# The original Llama-3 text layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextLayout:
    """How a Llama-3 chat is laid out in one string.

    The default is Meta's layout (what the Llama-3.2 chat template renders): ``<|begin_of_text|>``,
    ``\\n\\n`` after each header, nothing between turns. The seed document shows a newline after each
    ``<|eot_id|>`` and one after each header; ``text_to_messages`` accepts both and ``detect_layout``
    tells which one a string uses, so writing it back is byte-identical.
    """

    bos: bool = True
    header_sep: str = "\n\n"
    turn_sep: str = ""
    trailing: str = ""


LAYOUTS = {
    "llama3": TextLayout(),
    "newlines": TextLayout(header_sep="\n", turn_sep="\n"),
}


@dataclass
class ParsedText:
    """The turns read from a chat string, the layout they were written in, and every problem found."""

    messages: list[dict]
    layout: TextLayout | None
    problems: list[str]


def _split_pieces(text: str, pos: int) -> list[Piece]:
    """Cut a chat string (from character ``pos``) into marker and text pieces."""
    pieces: list[Piece] = []
    for match in _MARKER.finditer(text, pos):
        if match.start() > pos:
            pieces.append(("text", text[pos : match.start()], pos))
        pieces.append(("marker", match.group(), match.start()))
        pos = match.end()
    if pos < len(text):
        pieces.append(("text", text[pos:], pos))
    return pieces


def _unknown_markers(pieces: Sequence[Piece]) -> list[str]:
    """One problem per ``<|...|>`` marker the layout does not use, with the closest known one."""
    problems = []
    known = sorted(_KNOWN_MARKERS)
    for kind, value, start in pieces:
        if kind == "marker" and value not in _KNOWN_MARKERS:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the layout uses only {', '.join(known)}"
            problems.append(f"unknown marker {value} at character {start} — {hint}")
    return problems


@dataclass
class _TurnReader:
    """Reads the turns of a chat's pieces one by one, collecting every layout problem instead of stopping."""

    pieces: list[Piece]
    problems: list[str]
    messages: list[dict] = field(default_factory=list)
    header_seps: list[str] = field(default_factory=list)
    turn_seps: list[str] = field(default_factory=list)
    trailing: str = ""

    def read(self) -> None:
        """Each pass reads one piece between turns, or one whole turn."""
        i = 0
        while i < len(self.pieces):
            kind, value, start = self.pieces[i]
            if kind == "text":
                self._between_turns(value, start, last=i == len(self.pieces) - 1)
                i += 1
            elif value == START_HEADER:
                i = self._turn(i)
            else:
                self._misplaced(value, start)
                i += 1

    def _piece(self, i: int) -> Piece | None:
        return self.pieces[i] if i < len(self.pieces) else None

    def _between_turns(self, value: str, start: int, last: bool) -> None:
        """Text outside a turn: only whitespace is allowed (the turn separator or the trailing text)."""
        if value.strip():
            where = "before the first" if not self.messages else "between turns, before"
            self.problems.append(
                f"text {value.strip()[:30]!r} {where} {START_HEADER} at character {start} — "
                f"every turn must start with {START_HEADER}role{END_HEADER}"
            )
        elif last and self.messages:
            self.trailing = value
        elif self.messages:
            self.turn_seps.append(value)

    def _misplaced(self, value: str, start: int) -> None:
        """A known marker where a turn should start."""
        if value == BOT:
            self.problems.append(f"{BOT} at character {start}, not at the start — it may appear only once, first")
        else:
            self.problems.append(
                f"{value} at character {start} where a turn should start with {START_HEADER} — "
                f"write {START_HEADER}role{END_HEADER} before each turn"
            )

    def _turn(self, i: int) -> int:
        """Read ``START_HEADER role END_HEADER content EOT`` from piece ``i``; return the index after it."""
        start = self.pieces[i][2]
        role_piece, end_piece = self._piece(i + 1), self._piece(i + 2)
        if role_piece is None or role_piece[0] != "text" or end_piece is None or end_piece[1] != END_HEADER:
            self.problems.append(
                f"header at character {start} is not closed by {END_HEADER} — write "
                f"{START_HEADER}role{END_HEADER} (role = system, user or assistant)"
            )
            i += 1
            while i < len(self.pieces) and self.pieces[i][1] != START_HEADER:  # resynchronise on the next header
                i += 1
            return i
        role = role_piece[1]
        content_piece = self._piece(i + 3)
        if content_piece is not None and content_piece[0] == "text":
            content, close, step = content_piece[1], self._piece(i + 4), 5
        else:
            content, close, step = "", content_piece, 4
        if close is None or close[1] != EOT:
            self.problems.append(
                f"turn {role!r} starting at character {start} is not closed by {EOT} — end every "
                f"turn (the assistant's too) with {EOT}"
            )
            step -= 1 if close is not None else 0
        sep = "\n\n" if content.startswith("\n\n") else "\n" if content.startswith("\n") else ""
        self.header_seps.append(sep)
        self.messages.append({"role": role, "content": content[len(sep) :]})
        return i + step

    def layout(self, bos: bool) -> TextLayout | None:
        """The layout of the turns read (the first turn's separators); None when no turn was read."""
        if not self.messages:
            return None
        return TextLayout(
            bos=bos,
            header_sep=self.header_seps[0] if self.header_seps else "\n\n",
            turn_sep=self.turn_seps[0] if self.turn_seps else "",
            trailing=self.trailing,
        )


def parse_text(text: str) -> ParsedText:
    """Split a Llama-3 chat string into turns; collect every layout problem instead of stopping."""
    bos = text.startswith(BOT)
    pieces = _split_pieces(text, len(BOT) if bos else 0)
    problems = _unknown_markers(pieces)
    reader = _TurnReader([p for p in pieces if p[0] == "text" or p[1] in _KNOWN_MARKERS], problems)
    reader.read()
    if not reader.messages and not problems:
        problems.append(
            f"no {START_HEADER}role{END_HEADER} header found — the text field must hold the whole "
            "Llama-3 chat (system, user, assistant turns)"
        )
    return ParsedText(reader.messages, reader.layout(bos), problems)


def text_to_messages(text: str) -> list[dict]:
    """Parse one original-format chat string into ``[{"role", "content"}, ...]``.

    Raises ``DatasetError`` listing every broken header or unclosed turn.
    """
    parsed = parse_text(text)
    if parsed.problems:
        raise DatasetError("; ".join(parsed.problems))
    return parsed.messages


def detect_layout(text: str) -> TextLayout:
    """The ``TextLayout`` a chat string is written in (for byte-identical round trips)."""
    parsed = parse_text(text)
    if parsed.problems or parsed.layout is None:
        raise DatasetError("; ".join(parsed.problems) or "not a Llama-3 chat string")
    return parsed.layout


def messages_to_text(messages: Sequence[dict], bos: bool = True, layout: TextLayout | None = None) -> str:
    """Render messages in the original Llama-3 text layout (Meta's layout unless ``layout`` is given)."""
    layout = layout or TextLayout(bos=bos)
    turns = [
        f"{START_HEADER}{m['role']}{END_HEADER}{layout.header_sep}{m['content']}{EOT}" for m in messages
    ]
    return (BOT if layout.bos else "") + layout.turn_sep.join(turns) + layout.trailing


def layout_name(layout: TextLayout) -> str:
    """How the validator names a layout: its ``LAYOUTS`` key, or its separators."""
    name = next((k for k, v in LAYOUTS.items() if (v.header_sep, v.turn_sep) == (layout.header_sep, layout.turn_sep)),
                f"header {layout.header_sep!r}, turns {layout.turn_sep!r}")
    return f"{name!r}" + ("" if layout.bos else " without BOS")


# --------------------------------------------------------------------------------------------
# Writing records
# --------------------------------------------------------------------------------------------


def record_to_json(record: dict) -> str:
    """One messages-format line with the fixed key order (deterministic, UTF-8 kept readable)."""
    ordered = {key: record[key] for key in RECORD_KEYS if key in record}
    return json.dumps(ordered, ensure_ascii=False)


def write_jsonl(records: Sequence[dict], path: str | Path, to: str = "messages",
                layout: TextLayout | None = None) -> Path:
    """Write records as JSONL (LF endings, no BOM) in the ``messages`` or original ``text`` format."""
    if to not in {"messages", "text"}:
        raise ValueError(f"to={to!r}: use 'messages' or 'text'")
    if to == "messages":
        lines = [record_to_json(r) for r in records]
    else:
        lines = [json.dumps({"text": messages_to_text(r["messages"], layout=layout)}, ensure_ascii=False)
                 for r in records]
    return atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------
# Datasets for TRL and the loss mask
# --------------------------------------------------------------------------------------------


def to_prompt_completion(records: Sequence[dict]) -> Dataset:
    """``datasets.Dataset`` in TRL's conversational prompt–completion form (loss on the answer only).

    Columns: ``prompt`` (all turns but the last), ``completion`` ([the last, assistant, turn]),
    ``id``, ``topic``, ``kind``, ``keywords``.
    """
    return Dataset.from_dict({
        "prompt": [r["messages"][:-1] for r in records],
        "completion": [r["messages"][-1:] for r in records],
        "id": [r["id"] for r in records],
        "topic": [r["topic"] for r in records],
        "kind": [r["kind"] for r in records],
        "keywords": [list(r["keywords"]) for r in records],
    })


def to_text_dataset(records: Sequence[dict], tokenizer) -> Dataset:
    """``datasets.Dataset`` with one ``text`` column: each chat rendered by the tokenizer's template.

    This reproduces the original full-text training (the loss covers prompt and answer alike).
    """
    return Dataset.from_dict(
        {"text": [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]}
    )


def completion_mask(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its loss mask (1 = trained), computed the way TRL's SFTTrainer does.

    The prompt (all turns but the last) is tokenised with ``add_generation_prompt=True``, the whole chat
    without it; the completion starts where the two stop agreeing (``trl.data_utils.common_prefix_length``).
    """
    messages = list(messages)
    prompt_ids = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    input_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, input_ids)
    return list(input_ids), [0] * prompt_len + [1] * (len(input_ids) - prompt_len)
