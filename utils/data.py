"""The dataset: both JSONL formats, their validation, the converter and the seeded train/test split.

Two formats are read, one per file:

- **messages** (canonical): ``{"id", "messages": [system, user, assistant], "source", "topic", "kind",
  "keywords", "facts"}``; only ``messages`` is required;
- **text** (the original ``train_v3_combined_split.jsonl``): ``{"text": "<|begin_of_text|><|start_header_id|>
  system<|end_header_id|>\\n\\n...<|eot_id|>..."}``, the whole Llama-3 chat in one string.

Command line::

    python -m utils.data validate FILE [FILE ...] [--tokenizer llama-3.2] [--max-length 512]
    python -m utils.data convert IN OUT --to messages|text [--layout llama3|newlines] [--force]
    python -m utils.data build [--seed 42] [--test-fraction 0.12]

``validate`` reports every problem of every file as ``file:line: severity: what is wrong — how to fix``
and exits 1 when there is an error. ``build`` reads ``dataset/sources/utn_qa.yaml`` and writes the two
split files plus the counts block of ``dataset/README.md``.
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import random
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils.paths import DATASET_DIR, TEST_FILE, TRAIN_FILE, resolve_path

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
KINDS = ("fact", "combined", "out_of_scope")
# Metadata given to records read from files that carry none (the original text format).
DEFAULT_TOPIC = "sin_tema"
DEFAULT_KIND = "sin_tipo"
# Out-of-scope questions are answered by no norm of the corpus.
OUT_OF_SCOPE_SOURCE = "ninguna (fuera de alcance)"
RECORD_KEYS = ("id", "messages", "source", "topic", "kind", "keywords", "facts")

CORPUS_FILE = DATASET_DIR / "sources" / "utn_qa.yaml"
README_FILE = DATASET_DIR / "README.md"
COUNTS_START = "<!-- counts:start -->"
COUNTS_END = "<!-- counts:end -->"
DEFAULT_SEED = 42
DEFAULT_TEST_FRACTION = 0.12
MIN_TRAIN_QUESTIONS_PER_FACT = 2

BOT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DatasetError(ValueError):
    """A dataset file or corpus that cannot be used; the message lists every problem found."""


# --------------------------------------------------------------------------------------------
# Text normalisation
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
class _ParsedText:
    messages: list[dict]
    layout: TextLayout | None
    problems: list[str]


def _parse_text(text: str) -> _ParsedText:
    """Split a Llama-3 chat string into turns; collect every layout problem instead of stopping."""
    problems: list[str] = []
    messages: list[dict] = []
    bos = text.startswith(BOT)
    pos = len(BOT) if bos else 0
    header_seps: list[str] = []
    turn_seps: list[str] = []
    trailing = ""
    pieces = []  # (kind, value, start) with kind "marker" or "text"
    for match in _MARKER.finditer(text, pos):
        if match.start() > pos:
            pieces.append(("text", text[pos : match.start()], pos))
        pieces.append(("marker", match.group(), match.start()))
        pos = match.end()
    if pos < len(text):
        pieces.append(("text", text[pos:], pos))

    known = {BOT, START_HEADER, END_HEADER, EOT}
    for kind, value, start in pieces:
        if kind == "marker" and value not in known:
            close = difflib.get_close_matches(value, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"the layout uses only {', '.join(sorted(known))}"
            problems.append(f"unknown marker {value} at character {start} — {hint}")
    pieces = [p for p in pieces if p[0] == "text" or p[1] in known]
    i = 0
    while i < len(pieces):  # each pass reads one piece between turns, or one whole turn
        kind, value, start = pieces[i]
        if kind == "text":
            if value.strip():
                where = "before the first" if not messages else "between turns, before"
                problems.append(
                    f"text {value.strip()[:30]!r} {where} {START_HEADER} at character {start} — "
                    f"every turn must start with {START_HEADER}role{END_HEADER}"
                )
            elif i == len(pieces) - 1 and messages:
                trailing = value
            elif messages:
                turn_seps.append(value)
            i += 1
            continue
        if value == BOT:
            problems.append(
                f"{BOT} at character {start}, not at the start — it may appear only once, first"
            )
            i += 1
            continue
        if value != START_HEADER:
            problems.append(
                f"{value} at character {start} where a turn should start with {START_HEADER} — "
                f"write {START_HEADER}role{END_HEADER} before each turn"
            )
            i += 1
            continue
        # START_HEADER role END_HEADER content EOT
        role_piece = pieces[i + 1] if i + 1 < len(pieces) else None
        end_piece = pieces[i + 2] if i + 2 < len(pieces) else None
        if role_piece is None or role_piece[0] != "text" or end_piece is None or end_piece[1] != END_HEADER:
            problems.append(
                f"header at character {start} is not closed by {END_HEADER} — write "
                f"{START_HEADER}role{END_HEADER} (role = system, user or assistant)"
            )
            i += 1
            # resynchronise on the next START_HEADER
            while i < len(pieces) and pieces[i][1] != START_HEADER:
                i += 1
            continue
        role = role_piece[1]
        content_piece = pieces[i + 3] if i + 3 < len(pieces) else None
        if content_piece is not None and content_piece[0] == "text":
            content = content_piece[1]
            close = pieces[i + 4] if i + 4 < len(pieces) else None
            step = 5
        else:
            content, close, step = "", content_piece, 4
        if close is None or close[1] != EOT:
            problems.append(
                f"turn {role!r} starting at character {start} is not closed by {EOT} — end every "
                f"turn (the assistant's too) with {EOT}"
            )
            step -= 1 if close is not None else 0
        sep = "\n\n" if content.startswith("\n\n") else "\n" if content.startswith("\n") else ""
        header_seps.append(sep)
        messages.append({"role": role, "content": content[len(sep) :]})
        i += step
    if not messages and not problems:
        problems.append(
            f"no {START_HEADER}role{END_HEADER} header found — the text field must hold the whole "
            "Llama-3 chat (system, user, assistant turns)"
        )
    layout = None
    if messages:
        layout = TextLayout(
            bos=bos,
            header_sep=header_seps[0] if header_seps else "\n\n",
            turn_sep=turn_seps[0] if turn_seps else "",
            trailing=trailing,
        )
    return _ParsedText(messages, layout, problems)


def text_to_messages(text: str) -> list[dict]:
    """Parse one original-format chat string into ``[{"role", "content"}, ...]``.

    Raises ``DatasetError`` listing every broken header or unclosed turn.
    """
    parsed = _parse_text(text)
    if parsed.problems:
        raise DatasetError("; ".join(parsed.problems))
    return parsed.messages


def detect_layout(text: str) -> TextLayout:
    """The ``TextLayout`` a chat string is written in (for byte-identical round trips)."""
    parsed = _parse_text(text)
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


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem of a file: where (``path``, 1-based ``line``; 0 = the whole file) and what."""

    path: str
    line: int
    message: str  # "what is wrong — how to fix"
    severity: str = "error"  # "error" | "warning"

    def format(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.severity}: {self.message}"


@dataclass
class ValidationReport:
    """Everything ``validate_file`` found in one file, plus the records it could read."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    file_format: str | None = None  # "messages" | "text"
    n_lines: int = 0
    token_counts: dict[str, int] = field(default_factory=dict)  # id -> tokens (when a tokenizer was given)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, "error"))

    def warn(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, "warning"))

    def summary(self) -> str:
        fmt = f"{self.file_format} format" if self.file_format else "format unknown"
        verdict = "OK" if self.ok else "NOT USABLE"
        return (
            f"{self.path}: {verdict} — {len(self.records)} examples ({fmt}), "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )

    def format(self) -> str:
        """All problems, one per line (``file:line: severity: message``) sorted by line, then a summary."""
        ordered = sorted(self.problems, key=lambda p: (p.line, p.severity != "error"))
        return "\n".join([p.format() for p in ordered] + [self.summary()])


def _check_messages(messages: Any, report: ValidationReport, line: int) -> bool:
    """Check the roles and contents of one chat; report every problem; True when usable."""
    if not isinstance(messages, list) or not messages:
        report.error(line, "field 'messages' is empty or not a list — give a list of "
                           '{"role": ..., "content": ...} objects (system, user, assistant)')
        return False
    usable = True
    roles: list[str] = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            report.error(line, f"message {n} is not an object — write it as "
                               '{"role": "user", "content": "..."}')
            usable = False
            continue
        role, content = message.get("role"), message.get("content")
        if role is None or (isinstance(role, str) and not role.strip()):
            report.error(line, f"message {n} has a missing or empty 'role' — set it to system, user or assistant")
            usable = False
        elif role not in ROLES:
            report.error(line, f"unknown role {role!r} in message {n} — use system, user or assistant")
            usable = False
        else:
            roles.append(role)
        if content is None:
            report.error(line, f"message {n} ({role}) has no 'content' field — add the turn's text")
            usable = False
        elif not isinstance(content, str):
            report.error(line, f"message {n} ({role}) has a non-text 'content' — write it as a string")
            usable = False
        elif not content.strip():
            report.error(line, f"message {n} ({role}) has an empty 'content' — write the turn's text "
                               "or drop the example")
            usable = False
    if not usable:
        return False
    if ASSISTANT not in roles:
        report.error(line, "no assistant turn — the example must end with the answer "
                           '({"role": "assistant", "content": ...}) or it teaches nothing')
        return False
    expected = [SYSTEM] if roles[0] == SYSTEM else []
    body = roles[len(expected):]
    alternating = [USER if k % 2 == 0 else ASSISTANT for k in range(len(body))]
    if body != alternating or roles[-1] != ASSISTANT:
        report.error(line, f"roles out of order ({' → '.join(roles)}) — use an optional system turn "
                           "first, then user and assistant alternating, ending with assistant")
        return False
    return True


def _check_metadata(obj: dict, report: ValidationReport, line: int) -> bool:
    """Check the optional metadata fields of a messages-format record."""
    usable = True
    for key in ("id", "source", "topic"):
        if key in obj and (not isinstance(obj[key], (str, int)) or not str(obj[key]).strip()):
            report.error(line, f"field {key!r} is empty or not text — give it a value or remove the field")
            usable = False
    if "kind" in obj and obj["kind"] not in (*KINDS, DEFAULT_KIND):
        report.error(line, f"unknown kind {obj['kind']!r} — use one of {', '.join(KINDS)}")
        usable = False
    for key in ("keywords", "facts"):
        value = obj.get(key)
        if key in obj and (not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value)):
            report.error(line, f"field {key!r} must be a list of non-empty strings — fix or remove it")
            usable = False
    return usable


def _canonical(obj: dict, messages: list[dict], path: Path, line: int) -> dict:
    """A record with every canonical key, defaults where the file carried no metadata."""
    return {
        "id": str(obj.get("id", f"{path.stem}-{line}")),
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "source": str(obj.get("source", path.name)),
        "topic": str(obj.get("topic", DEFAULT_TOPIC)),
        "kind": str(obj.get("kind", DEFAULT_KIND)),
        "keywords": list(obj.get("keywords", [])),
        "facts": list(obj.get("facts", [])),
    }


def _layout_name(layout: TextLayout) -> str:
    name = next((k for k, v in LAYOUTS.items() if (v.header_sep, v.turn_sep) == (layout.header_sep, layout.turn_sep)),
                f"header {layout.header_sep!r}, turns {layout.turn_sep!r}")
    return f"{name!r}" + ("" if layout.bos else " without BOS")


def _read_lines(path: Path, report: ValidationReport) -> list[tuple[int, str]]:
    """Decode a JSONL file line by line; report BOM, CRLF, bad bytes and blank lines."""
    data = path.read_bytes()
    if not data.strip():
        report.error(1, "the file is empty — it must hold one JSON example per line")
        return []
    if data.startswith(b"\xef\xbb\xbf"):
        report.warn(1, "the file starts with a UTF-8 byte-order mark (BOM) — datasets.load_dataset skips it "
                       "but json.loads and most tools fail; save as UTF-8 without BOM (or run "
                       "`python -m utils.data convert`, which writes a clean copy)")
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    report.n_lines = len(raw_lines)
    crlf = [n for n, raw in enumerate(raw_lines, 1) if raw.endswith(b"\r")]
    if crlf:
        report.warn(crlf[0], f"Windows line ending (CRLF) on {len(crlf)} of {len(raw_lines)} lines, first here — "
                             "harmless for datasets.load_dataset, but save with LF endings so files compare "
                             "byte for byte (`python -m utils.data convert` does it)")
    lines: list[tuple[int, str]] = []
    for n, raw in enumerate(raw_lines, 1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            byte = raw[exc.start]
            guess = raw.decode("cp1252", errors="replace")[max(0, exc.start - 12): exc.start + 12]
            report.error(n, f"not valid UTF-8 (byte 0x{byte:02X} at column {exc.start + 1}, near {guess!r}; "
                            "the file looks saved as Latin-1/Windows-1252) — re-save it as UTF-8")
            continue
        if not text.strip():
            report.warn(n, "empty line — delete it (datasets.load_dataset skips it, line-by-line readers "
                           "fail on it, and it shifts every line number after it)")
            continue
        lines.append((n, text))
    return lines


def _load_tokenizer_arg(tokenizer):
    """Accept a tokenizer object or a model name for ``load_tokenizer``."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from utils.modeling import load_tokenizer

    return load_tokenizer(tokenizer)


def _name_of_tokenizer(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__).rstrip("/").split("/")[-1]


def _questions_by_file(path: Path) -> dict[str, int]:
    """Normalised question -> first line, read leniently (for the cross-file overlap check)."""
    found: dict[str, int] = {}
    try:
        raw_lines = path.read_bytes().lstrip(b"\xef\xbb\xbf").split(b"\n")
    except OSError:
        return found
    for n, raw in enumerate(raw_lines, 1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(obj, dict):
            continue
        messages = obj.get("messages")
        if messages is None and isinstance(obj.get("text"), str):
            messages = _parse_text(obj["text"]).messages
        if isinstance(messages, list):
            key = normalize_question(question_of(messages))
            if key:
                found.setdefault(key, n)
    return found


def validate_file(
    path: str | Path,
    tokenizer=None,
    max_length: int = 512,
    other_paths: Iterable[str | Path] = (),
) -> ValidationReport:
    """Check one JSONL file in either format and report every problem with its line.

    ``tokenizer`` (an object or a name for ``load_tokenizer``) adds the length check: a warning per
    example longer than ``max_length`` tokens once rendered with the tokenizer's chat template.
    ``other_paths`` (e.g. the test file when checking train) adds the cross-file question overlap check.
    """
    path = Path(path)
    report = ValidationReport(str(path))
    if not path.is_file():
        report.error(0, f"file not found ({path.resolve()}) — check the path and the file name")
        return report
    lines = _read_lines(path, report)
    seen_questions: dict[str, tuple[int, list[dict]]] = {}
    seen_ids: dict[str, int] = {}
    formats: dict[str, int] = {}  # format -> first line
    bos_lines: list[int] = []
    first_layout: tuple[TextLayout, int] | None = None  # text format: the first line's layout and line
    record_lines: list[int] = []
    for n, text in lines:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report.error(n, f"invalid JSON ({exc.msg} at column {exc.colno}) — each line must be one complete "
                            "JSON object; check quotes, commas and braces")
            continue
        if not isinstance(obj, dict):
            report.error(n, f"a JSON {type(obj).__name__}, not an object — write one "
                            '{"messages": [...]} (or {"text": "..."}) object per line')
            continue
        has_messages, has_text = "messages" in obj, "text" in obj
        if has_messages and has_text:
            report.error(n, "both 'messages' and 'text' fields — keep one of them (one format per file)")
            continue
        if not has_messages and not has_text:
            report.error(n, f"missing field 'messages' (or 'text' for the original format); found "
                            f"{sorted(obj) or 'no fields'} — add the chat under one of those keys")
            continue
        fmt = "messages" if has_messages else "text"
        formats.setdefault(fmt, n)
        if len(formats) > 1 and fmt != next(iter(formats)):
            first = next(iter(formats))
            report.error(n, f"uses the {fmt!r} format while line {formats[first]} uses {first!r} — one "
                            "format per file: convert one part with `python -m utils.data convert IN OUT --to "
                            f"{first}`")
            continue
        if fmt == "text":
            value = obj["text"]
            if not isinstance(value, str) or not value.strip():
                report.error(n, "field 'text' is empty or not a string — put the whole Llama-3 chat in it")
                continue
            parsed = _parse_text(value)
            if parsed.problems:
                for problem in parsed.problems:
                    report.error(n, f"broken Llama-3 text: {problem}")
                continue
            messages = parsed.messages
            if value.startswith(BOT):
                bos_lines.append(n)
            first_layout = first_layout or (parsed.layout, n)
            if messages_to_text(messages, layout=parsed.layout) != value:
                report.warn(n, "the turns of this chat are not all laid out alike (newlines after headers or "
                               "between turns differ) — converting it back to text writes one layout for all")
            elif parsed.layout != first_layout[0]:
                report.warn(n, f"laid out as {_layout_name(parsed.layout)} while line {first_layout[1]} is "
                               f"{_layout_name(first_layout[0])} — `convert --to text` writes one layout per file")
        else:
            messages = obj["messages"]
            if not _check_metadata(obj, report, n):
                continue
        if not _check_messages(messages, report, n):
            continue
        record = _canonical(obj, messages, path, n)
        if record["id"] in seen_ids:
            report.error(n, f"id {record['id']!r} already used on line {seen_ids[record['id']]} — ids must be unique")
            continue
        seen_ids[record["id"]] = n
        key = normalize_question(question_of(messages))
        if key in seen_questions:
            first_line, first_messages = seen_questions[key]
            if first_messages == record["messages"]:
                report.error(n, f"exact duplicate of line {first_line} — delete one of them")
            else:
                report.error(n, f"same question as line {first_line} (normalised: {key!r}) with a different "
                                "answer — keep one answer per question or merge them")
            continue
        seen_questions[key] = (n, record["messages"])
        report.records.append(record)
        record_lines.append(n)
    report.file_format = next(iter(formats), None)
    if lines and not report.records and report.ok:
        report.error(0, "no usable example — the file must hold at least one chat")

    for other in other_paths:
        other = Path(other)
        if other.resolve() == path.resolve():
            continue
        other_questions = _questions_by_file(other)
        for n, record in zip(record_lines, report.records):
            key = normalize_question(question_of(record["messages"]))
            if key in other_questions:
                report.error(n, f"same question as {other}:{other_questions[key]} (normalised: {key!r}) — a "
                                "question in both train and test leaks its answer; keep it in one split only")

    tokenizer = _load_tokenizer_arg(tokenizer)
    if tokenizer is not None and report.records:
        name = _name_of_tokenizer(tokenizer)
        ids = tokenizer.apply_chat_template(
            [r["messages"] for r in report.records], tokenize=True, return_dict=True
        )["input_ids"]
        too_long = []
        for n, record, example_ids in zip(record_lines, report.records, ids):
            report.token_counts[record["id"]] = len(example_ids)
            if len(example_ids) > max_length:
                too_long.append(n)
                report.warn(n, f"{len(example_ids)} tokens under {name}, longer than max_length={max_length} — "
                               f"the last {len(example_ids) - max_length} tokens (the end of the answer and its "
                               "end-of-turn) will be truncated; shorten the answer or raise max_length")
        if too_long:
            report.warn(0, f"{len(too_long)} of {len(report.records)} examples exceed max_length={max_length} "
                           f"under {name} (lines {', '.join(map(str, too_long[:10]))}"
                           f"{', ...' if len(too_long) > 10 else ''})")
        if bos_lines and tokenizer.bos_token and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
            report.warn(bos_lines[0], f"{len(bos_lines)} 'text' examples start with {BOT} and {name} adds its own "
                                      "BOS when tokenising plain text, so the original full-text training sees "
                                      "two BOS tokens — train on the messages format, or convert with "
                                      "`--to text --no-bos`")
    return report


def load_records(path: str | Path) -> list[dict]:
    """Read a JSONL file in either format as canonical records; ``DatasetError`` with the full report."""
    report = validate_file(resolve_path(path))
    if not report.ok:
        raise DatasetError(report.format())
    return report.records


# --------------------------------------------------------------------------------------------
# Writing and converting
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
    path = Path(path)
    if to == "messages":
        lines = [record_to_json(r) for r in records]
    else:
        lines = [json.dumps({"text": messages_to_text(r["messages"], layout=layout)}, ensure_ascii=False)
                 for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    return path


def convert_file(source: str | Path, target: str | Path, to: str, force: bool = False,
                 layout: TextLayout | None = None) -> Path:
    """Convert a JSONL file between formats; never writes over ``source``, nor over ``target`` unless forced."""
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve():
        raise DatasetError(f"{target}: the output is the input file — choose another output path "
                           "(the converter never writes over its input)")
    if target.exists() and not force:
        raise DatasetError(f"{target}: already exists — choose another output path or pass --force")
    records = load_records(source)
    return write_jsonl(records, target, to=to, layout=layout)


def to_prompt_completion(records: Sequence[dict]):
    """``datasets.Dataset`` in TRL's conversational prompt–completion form (loss on the answer only).

    Columns: ``prompt`` (all turns but the last), ``completion`` ([the last, assistant, turn]),
    ``id``, ``topic``, ``kind``, ``keywords``.
    """
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [r["messages"][:-1] for r in records],
        "completion": [r["messages"][-1:] for r in records],
        "id": [r["id"] for r in records],
        "topic": [r["topic"] for r in records],
        "kind": [r["kind"] for r in records],
        "keywords": [list(r["keywords"]) for r in records],
    })


def to_text_dataset(records: Sequence[dict], tokenizer):
    """``datasets.Dataset`` with one ``text`` column: each chat rendered by the tokenizer's template.

    This reproduces the original full-text training (the loss covers prompt and answer alike).
    """
    from datasets import Dataset

    return Dataset.from_dict(
        {"text": [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]}
    )


def completion_mask(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its loss mask (1 = trained), computed the way TRL's SFTTrainer does.

    The prompt (all turns but the last) is tokenised with ``add_generation_prompt=True``, the whole chat
    without it; the completion starts where the two stop agreeing (``trl.data_utils.common_prefix_length``).
    """
    from trl.data_utils import common_prefix_length

    messages = list(messages)
    prompt_ids = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    input_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, input_ids)
    return list(input_ids), [0] * prompt_len + [1] * (len(input_ids) - prompt_len)


# --------------------------------------------------------------------------------------------
# The shipped corpus and its seeded split
# --------------------------------------------------------------------------------------------

_SECTIONS = {"facts": "fact", "combined": "combined", "out_of_scope": "out_of_scope"}


def load_corpus(path: str | Path = CORPUS_FILE) -> dict:
    """Read the corpus YAML and check it whole; ``DatasetError`` lists every problem by item id."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: corpus not found — the build reads the question sources from this YAML")
    try:
        corpus = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc}) — fix the file's syntax") from None
    problems: list[str] = []
    if not isinstance(corpus.get("system_prompt"), str) or not corpus["system_prompt"].strip():
        problems.append("system_prompt: missing or empty — give the one system prompt (in Spanish)")
    fact_ids = {item.get("id") for item in corpus.get("facts") or [] if isinstance(item, dict)}
    seen_ids: set[str] = set()
    seen_questions: dict[str, str] = {}
    for section in _SECTIONS:
        items = corpus.get(section) or []
        if not isinstance(items, list):
            problems.append(f"{section}: must be a list of items")
            continue
        for k, item in enumerate(items):
            label = f"{section}[{k}]"
            if not isinstance(item, dict):
                problems.append(f"{label}: not a mapping")
                continue
            item_id = item.get("id")
            label = f"{section}[{k}] ({item_id})"
            if not isinstance(item_id, str) or not item_id:
                problems.append(f"{label}: missing id")
            elif item_id in seen_ids:
                problems.append(f"{label}: id {item_id} used twice — ids must be unique")
            seen_ids.add(item_id)
            for key in ("topic", "answer"):
                if not isinstance(item.get(key), str) or not item[key].strip():
                    problems.append(f"{label}: missing or empty {key!r}")
            keywords = item.get("keywords")
            if not isinstance(keywords, list) or not keywords or not all(isinstance(w, str) for w in keywords):
                problems.append(f"{label}: 'keywords' must be a non-empty list of strings")
            elif isinstance(item.get("answer"), str):
                answer = normalize_question(item["answer"])
                for word in keywords:
                    if normalize_question(word) not in answer:
                        problems.append(f"{label}: keyword {word!r} is not in its own answer — the keyword "
                                        "score would fail the reference itself; fix the keyword or the answer")
            questions = item.get("questions")
            if not isinstance(questions, list) or not questions:
                problems.append(f"{label}: 'questions' must be a non-empty list")
                continue
            for question in questions:
                if not isinstance(question, str) or not question.strip():
                    problems.append(f"{label}: empty question")
                    continue
                key = normalize_question(question)
                if key in seen_questions:
                    problems.append(f"{label}: question {question!r} repeats one of {seen_questions[key]} "
                                    "once normalised (case, accents, punctuation) — reword or drop it")
                seen_questions.setdefault(key, str(item_id))
            if section == "facts":
                if len(questions) < MIN_TRAIN_QUESTIONS_PER_FACT:
                    problems.append(f"{label}: a fact needs at least {MIN_TRAIN_QUESTIONS_PER_FACT} questions "
                                    "(they all stay in train)")
                if not isinstance(item.get("source"), str) or not item["source"].strip():
                    problems.append(f"{label}: missing 'source' (the norm and article)")
            if section == "combined":
                facts = item.get("facts")
                if not isinstance(facts, list) or len(facts) < 2:
                    problems.append(f"{label}: 'facts' must list at least two fact ids")
                else:
                    for fact in facts:
                        if fact not in fact_ids:
                            problems.append(f"{label}: fact {fact!r} is not an id under 'facts'")
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
    return record["id"].rsplit("-q", 1)[0]


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
    items: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        items[_item_id(record)].append(record)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for item_id, item_records in items.items():
        by_kind[item_records[0]["kind"]].append(item_id)
    target = round(test_fraction * len(records))
    test_ids: set[str] = set()

    # Whole items: the same share of out-of-scope and combined items as of all questions.
    for kind in ("out_of_scope", "combined"):
        pool = sorted(by_kind.get(kind, []))
        n_items = round(test_fraction * len(pool))
        for item_id in rng.sample(pool, n_items):
            test_ids.update(r["id"] for r in items[item_id])

    # Fact items fill the rest: one question per fact per round, topics in proportion to their size
    # (systematic sampling: the k-th pick of a topic with n questions sorts at (k + u) / n).
    facts = sorted(by_kind.get("fact", []))
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
    for _, fact in slots[: max(0, target - len(test_ids))]:
        candidates = [r["id"] for r in items[fact] if r["id"] not in test_ids]
        test_ids.add(rng.choice(candidates))

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


def count_table(splits: dict[str, Sequence[dict]], by: str = "kind"):
    """Examples per value of ``by`` (``kind`` or ``topic``) and split, with totals (a pandas DataFrame)."""
    import pandas as pd

    frame = pd.DataFrame(
        [{"split": name, by: r[by]} for name, records in splits.items() for r in records],
        columns=["split", by],
    )
    table = pd.crosstab(frame[by], frame["split"], margins=True, margins_name="total")
    columns = [name for name in splits if name in table.columns] + ["total"]
    table = table[columns]
    if by == "kind":
        order = [k for k in (*KINDS, DEFAULT_KIND) if k in table.index] + ["total"]
        table = table.loc[order]
    table.columns.name = None
    return table


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
        readme.write_text(new, encoding="utf-8", newline="\n")
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


# --------------------------------------------------------------------------------------------
# Inspection helpers (notebook 01)
# --------------------------------------------------------------------------------------------


def tokenizer_label(name: str) -> str:
    """How tables and figures name the tokenizer of a model name."""
    from utils.modeling import resolve_model

    return "Llama-3.2" if name == "llama-3.2" else resolve_model(name).label


def load_tokenizer_or_fallback(name: str, fallback: str = "llama-3.2") -> tuple[Any, str]:
    """The tokenizer of ``name`` and its label; the ``fallback`` one (with a printed note) if unavailable."""
    from utils.modeling import ModelNotAvailableError, load_tokenizer

    try:
        return load_tokenizer(name), tokenizer_label(name)
    except ModelNotAvailableError as exc:
        print(f"Nota: no se pudo cargar el tokenizador de {name!r}: {exc}\n"
              f"Se usa en su lugar el tokenizador {fallback!r}; sus longitudes valen para {name} solo si "
              "ambos comparten vocabulario y plantilla de chat.")
        return load_tokenizer(fallback), f"{tokenizer_label(fallback)} (en lugar de {name})"


def load_tokenizers(model_name: str, reference: str = "llama-3.2") -> dict[str, Any]:
    """Label -> tokenizer for the reference tokenizer and the model's own (once, if it is the same)."""
    tokenizers = {tokenizer_label(reference): _load_tokenizer_arg(reference)}
    if model_name != reference:
        tokenizer, label = load_tokenizer_or_fallback(model_name, fallback=reference)
        if label.startswith(f"{tokenizer_label(reference)} (en lugar de"):
            print(f"Las longitudes de {model_name} se leen en la fila de {tokenizer_label(reference)}.")
        else:
            tokenizers[label] = tokenizer
    return tokenizers


def _leading(ids: Sequence[int], token_id: int | None) -> int:
    """How many times ``token_id`` repeats at the start of ``ids`` (2 = a duplicated BOS)."""
    count = 0
    while token_id is not None and count < len(ids) and ids[count] == token_id:
        count += 1
    return count


def token_lengths(splits: dict[str, Sequence[dict]], tokenizer, label: str):
    """Tokens of prompt, answer and whole example per record (pandas), split as TRL splits them.

    ``prompt`` counts the masked tokens (system + user + generation prompt), ``respuesta`` the trained
    ones (answer and end-of-turn), ``total`` their sum: the sequence length seen in training.
    """
    import pandas as pd
    from trl.data_utils import common_prefix_length

    rows = []
    for split, records in splits.items():
        chats = [list(r["messages"]) for r in records]
        if not chats:
            continue
        prompts = tokenizer.apply_chat_template(
            [c[:-1] for c in chats], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True)["input_ids"]
        # The original full-text training: the rendered chat tokenised as plain text, as TRL does for a
        # "text" column (the tokenizer may add its own BOS in front of the template's).
        texts = tokenizer(tokenizer.apply_chat_template(chats, tokenize=False))["input_ids"]
        for record, prompt_ids, ids, text_ids in zip(records, prompts, full, texts):
            n_prompt = common_prefix_length(prompt_ids, ids)
            rows.append({"tokenizador": label, "split": split, "id": record["id"], "topic": record["topic"],
                         "kind": record["kind"], "prompt": n_prompt, "respuesta": len(ids) - n_prompt,
                         "total": len(ids), "texto_completo": len(text_ids),
                         "bos_texto_completo": _leading(text_ids, tokenizer.bos_token_id)})
    return pd.DataFrame(rows)


def length_summary(lengths, max_length: int = 512):
    """Per tokenizer and split: median, 95th percentile and maximum tokens, and the share truncated."""
    grouped = lengths.groupby(["tokenizador", "split"], sort=False)
    summary = grouped.agg(
        ejemplos=("total", "size"),
        prompt_mediana=("prompt", "median"),
        respuesta_mediana=("respuesta", "median"),
        total_mediana=("total", "median"),
        total_p95=("total", lambda x: x.quantile(0.95)),
        total_max=("total", "max"),
        truncados=("total", lambda x: int((x > max_length).sum())),
    )
    summary["truncados_pct"] = 100 * summary["truncados"] / summary["ejemplos"]
    return summary.reset_index()


def plot_token_lengths(lengths, max_length: int = 512):
    """Histograms of prompt, answer and total tokens (one row per tokenizer) with the length limit drawn."""
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS

    import numpy as np

    tokenizers = list(dict.fromkeys(lengths["tokenizador"]))
    parts = [("prompt", "Prompt (enmascarado)"), ("respuesta", "Respuesta + fin de turno (entrenada)"),
             ("total", "Ejemplo completo")]
    upper = 1.08 * max(max_length, int(lengths[["prompt", "respuesta", "total"]].to_numpy().max()))
    bins = np.linspace(0, upper, 109)  # the same bins in every panel, so heights compare
    fig, axes = plt.subplots(len(tokenizers), 3, figsize=(11, 3.2 * len(tokenizers)), squeeze=False,
                             sharex=True)
    for row, name in zip(axes, tokenizers):
        data = lengths[lengths["tokenizador"] == name]
        for ax, (column, title) in zip(row, parts):
            for split in dict.fromkeys(data["split"]):
                values = data.loc[data["split"] == split, column]
                ax.hist(values, bins=bins, alpha=0.7, label=f"{split} (n={len(values)})",
                        color=COLORS.get("train" if split == "train" else "eval"))
            over = int((data[column] > max_length).sum())
            ax.axvline(max_length, color=COLORS["budget"], linestyle="--", linewidth=1.2,
                       label=f"max_seq_length = {max_length} ({over} por encima)")
            ax.set_title(f"{title}\n{name}", fontsize=10)
            ax.set_xlim(0, upper)
            ax.set_ylabel("Ejemplos")
        row[2].legend(fontsize=8, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("Longitud (tokens)")
    fig.tight_layout()
    return fig


def plot_counts(table, by: str = "topic"):
    """Horizontal bars of examples per topic (or kind) and split, from a ``count_table`` without totals."""
    import matplotlib.pyplot as plt

    from utils.plotting import COLORS

    table = table.drop(index="total", columns="total", errors="ignore").iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(table) + 1.5))
    left = None
    for split in table.columns:
        ax.barh(table.index, table[split], left=left, label=split,
                color=COLORS.get("train" if split == "train" else "eval"))
        left = table[split] if left is None else left + table[split]
    ax.set_xlabel("Ejemplos")
    ax.set_ylabel("Tema" if by == "topic" else "Tipo")
    ax.legend()
    fig.tight_layout()
    return fig


def loss_token_share(lengths):
    """Per tokenizer: tokens that carry loss with prompt–completion vs the original full-text training.

    Full text trains every token of the sequence (including a duplicated BOS, counted in ``bos_al_inicio``).
    """
    grouped = lengths.groupby("tokenizador", sort=False).agg(
        tokens_prompt_completion=("total", "sum"),
        con_perdida_prompt_completion=("respuesta", "sum"),
        tokens_texto_completo=("texto_completo", "sum"),
        bos_al_inicio=("bos_texto_completo", "max"),
    )
    grouped["con_perdida_texto_completo"] = grouped["tokens_texto_completo"]
    grouped["pct_con_perdida_prompt_completion"] = (
        100 * grouped["con_perdida_prompt_completion"] / grouped["tokens_prompt_completion"]
    )
    return grouped.reset_index()


def overlap_checks(splits: dict[str, Sequence[dict]]):
    """Duplicate questions within each split, test questions present in train, untaught test facts."""
    import pandas as pd

    rows = []
    for name, records in splits.items():
        keys = Counter(normalize_question(question_of(r["messages"])) for r in records)
        rows.append({"chequeo": f"preguntas repetidas dentro de {name}",
                     "resultado": sum(c - 1 for c in keys.values() if c > 1)})
    train, test = splits.get("train", []), splits.get("test", [])
    train_keys = {normalize_question(question_of(r["messages"])) for r in train}
    taught = {f for r in train for f in r["facts"]}
    rows.append({"chequeo": "preguntas de test con la misma redacción normalizada en train",
                 "resultado": sum(normalize_question(question_of(r["messages"])) in train_keys for r in test)})
    rows.append({"chequeo": "ejemplos de test sobre hechos que train no enseña",
                 "resultado": sum(any(f not in taught for f in r["facts"]) for r in test)})
    rows.append({"chequeo": "respuestas de test idénticas a alguna de train (misma respuesta, otra redacción)",
                 "resultado": sum(answer_of(r["messages"]) in {answer_of(t["messages"]) for t in train}
                                  for r in test)})
    return pd.DataFrame(rows)


def loss_mask_html(tokenizer, messages: Sequence[dict]) -> str:
    """HTML of a chat token by token: grey = masked prompt, green = tokens that carry the loss."""
    input_ids, mask = completion_mask(tokenizer, messages)
    spans = []
    for token_id, trained in zip(input_ids, mask):
        piece = tokenizer.decode([token_id])
        shown = html.escape(piece).replace("\n", "↵<br>")
        style = "background:#b7e4c7;" if trained else "background:#e9ecef;color:#6c757d;"
        spans.append(f'<span style="{style}border-right:1px solid #fff;font-family:monospace">{shown}</span>')
    n_trained = sum(mask)
    legend = (f"<p><b>{len(input_ids)} tokens</b>: <span style='background:#e9ecef'>{len(input_ids) - n_trained} "
              f"enmascarados (prompt, etiqueta -100)</span> · <span style='background:#b7e4c7'>{n_trained} con "
              "pérdida (respuesta y fin de turno)</span></p>")
    return legend + "<div style='line-height:1.9'>" + "".join(spans) + "</div>"


def dataset_summary(splits: dict[str, Sequence[dict]], lengths, max_length: int = 512):
    """Summary table of the splits (examples per kind, facts, topics, token lengths) for the thesis."""
    import pandas as pd

    table = {}
    for name, records in splits.items():
        kinds = Counter(r["kind"] for r in records)
        column = {"Ejemplos": len(records)}
        kind_labels = (("fact", "Hechos simples"), ("combined", "Combinadas"), ("out_of_scope", "Fuera de alcance"))
        for kind, label in kind_labels:
            column[label] = kinds.get(kind, 0)
        column["Hechos distintos"] = len({f for r in records for f in r["facts"]})
        column["Temas"] = len({r["topic"] for r in records})
        for label, data in lengths[lengths["split"] == name].groupby("tokenizador", sort=False):
            column[f"Tokens (mediana) — {label}"] = int(data["total"].median())
            column[f"Tokens (máx.) — {label}"] = int(data["total"].max())
            column[f"Más de {max_length} tokens — {label}"] = int((data["total"] > max_length).sum())
        table[name] = column
    return pd.DataFrame(table)


def describe_findings(splits: dict[str, Sequence[dict]], lengths, checks, max_length: int = 512) -> str:
    """Markdown bullets (Spanish) stating what the measured numbers show, for the notebook's conclusions."""
    total = sum(len(r) for r in splits.values())
    test = len(splits.get("test", []))
    lines = [f"- El corpus tiene **{total} ejemplos**; test guarda **{test}** ({test / max(total, 1):.1%})."]
    for label, data in lengths.groupby("tokenizador", sort=False):
        over = int((data["total"] > max_length).sum())
        lines.append(
            f"- Con el tokenizador **{label}** el ejemplo más largo mide **{int(data['total'].max())} tokens** "
            f"(mediana {int(data['total'].median())}); **{over}** de {len(data)} superan `max_seq_length = "
            f"{max_length}`" + (" y se truncarían." if over else ": con este corpus no se trunca nada.")
        )
    share = loss_token_share(lengths)
    for _, row in share.iterrows():
        lines.append(
            f"- {row['tokenizador']}: con prompt–completion la pérdida cae sobre el "
            f"**{row['pct_con_perdida_prompt_completion']:.1f}%** de los tokens (la respuesta y su fin de turno); "
            "el entrenamiento original sobre `text` la calcula sobre todos"
            + (f", incluido un BOS repetido ({int(row['bos_al_inicio'])} al inicio)."
               if row["bos_al_inicio"] > 1 else ".")
        )
    leaks = checks.set_index("chequeo")["resultado"]
    bad = {k: int(v) for k, v in leaks.items() if v and not k.startswith("respuestas de test")}
    lines.append("- Solapamiento: " + ("ninguna pregunta de test aparece en train (redacción normalizada), no hay "
                 "duplicados y todo hecho evaluado se enseña en train." if not bad else
                 "**hay problemas**: " + "; ".join(f"{k}: {v}" for k, v in bad.items()) + "."))
    return "\n".join(lines)


def save_latex_table(table, name: str, caption: str, label: str | None = None) -> Path:
    """Write ``figures/<name>.tex`` (a ``table`` environment made by ``DataFrame.to_latex``)."""
    from utils.paths import figures_dir

    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tex"
    latex = table.to_latex(caption=caption, label=label or f"tab:{name}", position="htbp",
                           float_format="%.1f", escape=True)
    path.write_text(latex, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.files]
    tokenizer = None
    if args.tokenizer:
        from utils.modeling import ModelNotAvailableError

        try:
            tokenizer = _load_tokenizer_arg(args.tokenizer)
        except ModelNotAvailableError as exc:
            print(f"error: --tokenizer {args.tokenizer}: {exc}", file=sys.stderr)
            return 2
    failed = False
    for path in paths:
        others = [p for p in paths if p != path]
        report = validate_file(path, tokenizer=tokenizer, max_length=args.max_length, other_paths=others)
        print(report.format())
        failed |= not report.ok
    return 1 if failed else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    layout = LAYOUTS[args.layout]
    if args.no_bos:
        layout = TextLayout(False, layout.header_sep, layout.turn_sep, layout.trailing)
    try:
        out = convert_file(args.input, args.output, to=args.to, force=args.force, layout=layout)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.to} format)")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        summary = build_dataset(seed=args.seed, test_fraction=args.test_fraction, corpus_path=args.corpus)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {summary['train_path']} ({summary['train']} examples) and {summary['test_path']} "
          f"({summary['test']} examples, {summary['test_share']:.1%} of all)")
    if summary["readme_updated"]:
        print(f"updated the counts block of {README_FILE}")
    else:
        print(f"warning: {README_FILE} has no {COUNTS_START} ... {COUNTS_END} block; counts not written",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m utils.data``."""
    parser = argparse.ArgumentParser(prog="python -m utils.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="report every problem of JSONL files (train and test together: overlap)")
    p.add_argument("files", nargs="+")
    p.add_argument("--tokenizer", help="check lengths with this tokenizer: llama-3.2, embedded, a hub id or folder")
    p.add_argument("--max-length", type=int, default=512, help="max_seq_length of the training (default 512)")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("convert", help="convert between the messages and the original text format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=["messages", "text"])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="llama3",
                   help="text layout: llama3 (Meta's, default) or newlines (newline after headers and turns)")
    p.add_argument("--no-bos", action="store_true", help=f"text format without the leading {BOT}")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file (never the input)")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("build", help="write the train/test split files from the corpus YAML")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    p.add_argument("--corpus", default=str(CORPUS_FILE), help="corpus YAML (default: dataset/sources/utn_qa.yaml)")
    p.set_defaults(func=_cmd_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
