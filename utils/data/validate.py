"""The validator: every problem of a JSONL file in either format, with its line and how to fix it.

``validate_file`` never stops at the first problem; ``load_records`` and ``convert_file`` use it, so a broken
file is refused with the whole report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from utils.data.records import (
    ASSISTANT,
    BOT,
    DEFAULT_KIND,
    DEFAULT_TOPIC,
    KINDS,
    ROLES,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
    DatasetError,
    TextLayout,
    layout_name,
    messages_to_text,
    normalize_question,
    parse_text,
    question_of,
    special_tokens_in,
    write_jsonl,
)
from utils.data.stats import sequence_lengths
from utils.data.tokenizers import as_tokenizer, tokenizer_name, tokenizer_special_tokens
from utils.paths import resolve_path


SPLIT_OVERLAP = "split_overlap"  # Problem.code of a question in both splits (or train and test one file)


@dataclass(frozen=True)
class Problem:
    """One problem of a file: where (``path``, 1-based ``line``; 0 = the whole file) and what."""

    path: str
    line: int
    message: str  # "what is wrong — how to fix"
    severity: str = "error"  # "error" | "warning"
    code: str = ""  # a kind a caller may acknowledge: SPLIT_OVERLAP

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
    leaked_ids: list[str] = field(default_factory=list)  # ids whose question the other split also asks
    record_lines: list[int] = field(default_factory=list)  # the file line of each record, in order

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, line: int, message: str, code: str = "") -> None:
        self.problems.append(Problem(self.path, line, message, "error", code))

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


def _check_messages(messages: Any, report: ValidationReport, line: int,
                    special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> bool:
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
        else:
            usable &= _check_special_tokens(content, n, role, special_tokens, report, line)
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


def _check_special_tokens(content: str, n: int, role: Any, special_tokens: tuple[str, ...],
                          report: ValidationReport, line: int) -> bool:
    """An error per special token inside a turn's content: a chat marker would open or close a turn (a fake turn,
    an early stop); any other becomes one control id instead of its text."""
    found = special_tokens_in(content, special_tokens)
    for token in found:
        report.error(line, f"message {n} ({role}) contains the special token {token} at character "
                           f"{content.index(token)} — the tokenizer reads it as one control token, not as text (a "
                           "chat marker would open or close a turn in training: a fake turn, an early stop); remove "
                           "it or write it without its brackets")
    return not found


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


def _read_bytes(path: Path, report: ValidationReport) -> bytes | None:
    """The file's bytes; None after one error when it cannot be read or is UTF-16 rather than UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.error(0, f"cannot read the file ({exc.strerror or exc}) — check its permissions and the path")
        return None
    if data.startswith(b"\x1f\x8b"):
        report.error(1, "the file is gzip-compressed, not JSONL text — decompress it first (`gunzip FILE`)")
        return None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        how = "a UTF-16 byte-order mark" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "NUL bytes"
        report.error(1, f"the file is UTF-16 ({how}), not UTF-8 — save as UTF-8 (an editor's \"Save with "
                        "encoding\", or `iconv -f UTF-16 -t UTF-8 IN > OUT`)")
        return None
    return data


def _read_lines(path: Path, report: ValidationReport) -> list[tuple[int, str]]:
    """Decode a JSONL file line by line; report BOM, CRLF, bad bytes and blank lines."""
    data = _read_bytes(path, report)
    if data is None:
        return []
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
        except (ValueError, RecursionError):  # bad bytes or JSON, huge numbers, deep nesting: validate says so
            continue
        if not isinstance(obj, dict):
            continue
        messages = obj.get("messages")
        if messages is None and isinstance(obj.get("text"), str):
            messages = parse_text(obj["text"]).messages
        if isinstance(messages, list):
            key = normalize_question(question_of(messages))
            if key:
                found.setdefault(key, n)
    return found


@dataclass
class _Seen:
    """What ``validate_file`` remembers from the lines read so far."""

    questions: dict[str, tuple[int, list[dict]]] = field(default_factory=dict)  # key -> (line, messages)
    ids: dict[str, int] = field(default_factory=dict)  # id -> line
    formats: dict[str, int] = field(default_factory=dict)  # format -> first line
    bos_lines: list[int] = field(default_factory=list)  # text lines that start with BOS
    first_layout: tuple[TextLayout, int] | None = None  # text format: the first line's layout and line
    record_lines: list[int] = field(default_factory=list)  # the line of each accepted record
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS  # refused in content: the templates' and the tokenizer's


def _parse_json(n: int, text: str, report: ValidationReport) -> Any:
    """The JSON value of one line; None after one error (bad JSON, deep nesting, a huge number, a lone surrogate)."""
    try:
        obj = json.loads(text)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # what writing it back needs
    except json.JSONDecodeError as exc:
        report.error(n, f"invalid JSON ({exc.msg} at column {exc.colno}) — each line must be one complete "
                        "JSON object; check quotes, commas and braces")
    except RecursionError:
        report.error(n, "JSON nested too deeply to read — an example is one flat object "
                        '{"messages": [{"role": ..., "content": ...}, ...]}; remove the nesting')
    except UnicodeEncodeError as exc:
        report.error(n, f"holds a lone surrogate {exc.object[exc.start:exc.end]!r} (a \\uD800-\\uDFFF escape "
                        "without its pair), which is not a character and cannot be saved as UTF-8 — fix or remove "
                        "that \\u escape")
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        report.error(n, f"unreadable JSON value ({str(exc).split(':')[0]}) — a number this long is not valid "
                        "here; write it as a string or remove it")
    else:
        return obj
    return None


def _read_object(n: int, text: str, report: ValidationReport) -> dict | None:
    """The JSON object of one line, holding exactly one of ``messages`` / ``text``; None after an error."""
    obj = _parse_json(n, text, report)
    if obj is None and text.strip() != "null":
        return None
    if not isinstance(obj, dict):
        report.error(n, f"a JSON {type(obj).__name__}, not an object — write one "
                        '{"messages": [...]} (or {"text": "..."}) object per line')
        return None
    has_messages, has_text = "messages" in obj, "text" in obj
    if has_messages and has_text:
        report.error(n, "both 'messages' and 'text' fields — keep one of them (one format per file)")
        return None
    if not has_messages and not has_text:
        report.error(n, f"missing field 'messages' (or 'text' for the original format); found "
                        f"{sorted(obj) or 'no fields'} — add the chat under one of those keys")
        return None
    return obj


def _line_format(obj: dict, n: int, report: ValidationReport, seen: _Seen) -> str | None:
    """``"messages"`` or ``"text"``; None (after an error) when the file's first line used the other one."""
    fmt = "messages" if "messages" in obj else "text"
    seen.formats.setdefault(fmt, n)
    first = next(iter(seen.formats))
    if fmt != first:
        report.error(n, f"uses the {fmt!r} format while line {seen.formats[first]} uses {first!r} — one "
                        "format per file: convert one part with `python -m utils.data convert IN OUT --to "
                        f"{first}`")
        return None
    return fmt


def _text_messages(value: Any, n: int, report: ValidationReport, seen: _Seen) -> list[dict] | None:
    """The turns of a ``text`` field; None after an error. Warns when its layout differs from line to line."""
    if not isinstance(value, str) or not value.strip():
        report.error(n, "field 'text' is empty or not a string — put the whole Llama-3 chat in it")
        return None
    parsed = parse_text(value)
    if parsed.problems:
        for problem in parsed.problems:
            report.error(n, f"broken Llama-3 text: {problem}")
        return None
    if value.startswith(BOT):
        seen.bos_lines.append(n)
    seen.first_layout = seen.first_layout or (parsed.layout, n)
    first_layout, first_line = seen.first_layout
    if messages_to_text(parsed.messages, layout=parsed.layout) != value:
        report.warn(n, "the turns of this chat are not all laid out alike (newlines after headers or "
                       "between turns differ) — converting it back to text writes one layout for all")
    elif parsed.layout != first_layout:
        report.warn(n, f"laid out as {layout_name(parsed.layout)} while line {first_line} is "
                       f"{layout_name(first_layout)} — `convert --to text` writes one layout per file")
    return parsed.messages


def _accept_record(obj: dict, messages: list[dict], path: Path, n: int, report: ValidationReport,
                   seen: _Seen) -> None:
    """Add the line's record to the report unless its id or its question was already used."""
    record = _canonical(obj, messages, path, n)
    if record["id"] in seen.ids:
        report.error(n, f"id {record['id']!r} already used on line {seen.ids[record['id']]} — ids must be unique")
        return
    seen.ids[record["id"]] = n
    key = normalize_question(question_of(messages))
    if key in seen.questions:
        first_line, first_messages = seen.questions[key]
        if first_messages == record["messages"]:
            report.error(n, f"exact duplicate of line {first_line} — delete one of them")
        else:
            report.error(n, f"same question as line {first_line} (normalised: {key!r}) with a different "
                            "answer — keep one answer per question or merge them")
        return
    seen.questions[key] = (n, record["messages"])
    report.records.append(record)
    seen.record_lines.append(n)


def _check_line(n: int, text: str, path: Path, report: ValidationReport, seen: _Seen) -> None:
    """Check one line of the file; its record joins the report when it is usable."""
    obj = _read_object(n, text, report)
    fmt = _line_format(obj, n, report, seen) if obj is not None else None
    if fmt is None:
        return
    if fmt == "text":
        messages = _text_messages(obj["text"], n, report, seen)
    else:
        messages = obj["messages"] if _check_metadata(obj, report, n) else None
    if messages is not None and _check_messages(messages, report, n, seen.special_tokens):
        _accept_record(obj, messages, path, n, report, seen)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same real file (symlinks, hard links, ``..`` and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _check_overlap(report: ValidationReport, path: Path, other: Path, record_lines: list[int]) -> None:
    """An error for every question that ``other`` (the other split) also asks; one if it is the same file."""
    if same_file(other, path):
        report.error(0, f"is the same file as {other} — train and test must be different files, or every "
                        "test answer is trained on", SPLIT_OVERLAP)
        report.leaked_ids.extend(str(r["id"]) for r in report.records)
        return
    other_questions = _questions_by_file(other)
    for n, record in zip(record_lines, report.records):
        key = normalize_question(question_of(record["messages"]))
        if key in other_questions:
            report.leaked_ids.append(str(record["id"]))
            report.error(n, f"same question as {other}:{other_questions[key]} (normalised: {key!r}) — a "
                            "question in both train and test leaks its answer; keep it in one split only",
                         SPLIT_OVERLAP)


def _check_lengths(report: ValidationReport, tokenizer: Any, max_seq_length: int, seen: _Seen) -> None:
    """Count every record's tokens under ``tokenizer``; warn about truncation and about a doubled BOS.

    An example whose prompt alone fills ``max_seq_length`` is an error: training would drop it (no answer
    token left), and ``load_training_data`` refuses that unless ``allow_dropping_long_examples``.
    """
    name = tokenizer_name(tokenizer)
    too_long = []
    for n, record, (prompt, total) in zip(seen.record_lines, report.records,
                                          sequence_lengths(report.records, tokenizer)):
        report.token_counts[record["id"]] = total
        if prompt >= max_seq_length:
            too_long.append(n)
            report.error(n, f"the prompt alone (system + question) is {prompt} tokens under {name}, at least "
                            f"max_seq_length={max_seq_length} — training would drop this example entirely (no "
                            "answer token left); shorten the system prompt or the question, or raise max_seq_length")
        elif total > max_seq_length:
            too_long.append(n)
            report.warn(n, f"{total} tokens under {name}, longer than max_seq_length={max_seq_length} "
                           f"— the last {total - max_seq_length} tokens (the end of the answer and its "
                           "end-of-turn) will be truncated; shorten the answer or raise max_seq_length")
    if too_long:
        report.warn(0, f"{len(too_long)} of {len(report.records)} examples exceed max_seq_length={max_seq_length} "
                       f"under {name} (lines {', '.join(map(str, too_long[:10]))}"
                       f"{', ...' if len(too_long) > 10 else ''})")
    bos_lines = seen.bos_lines
    if bos_lines and tokenizer.bos_token and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        report.warn(bos_lines[0], f"{len(bos_lines)} 'text' examples start with {BOT} and {name} adds its own "
                                  "BOS when tokenising plain text, so the original full-text training sees "
                                  "two BOS tokens — train on the messages format, or convert with "
                                  "`--to text --no-bos`")


def validate_file(
    path: str | Path,
    tokenizer: Any = None,
    max_seq_length: int = 512,
    other_paths: Iterable[str | Path] = (),
) -> ValidationReport:
    """Check one JSONL file in either format and report every problem with its line.

    ``tokenizer`` (an object or a name for ``load_tokenizer``) adds the length check: a warning per
    example longer than ``max_seq_length`` tokens once rendered with the tokenizer's chat template; its
    special tokens join ``SPECIAL_TOKENS`` among those refused inside a turn's content.
    ``other_paths`` (e.g. the test file when checking train) adds the cross-file question overlap check.
    """
    path = Path(path)
    report = ValidationReport(str(path))
    if path.is_dir():
        report.error(0, f"is a directory ({path.resolve()}), not a file — give the path of a .jsonl file")
        return report
    if not path.is_file():
        report.error(0, f"file not found ({path.resolve()}) — check the path and the file name")
        return report
    tokenizer = as_tokenizer(tokenizer)
    lines = _read_lines(path, report)
    seen = _Seen(special_tokens=tuple(dict.fromkeys([*SPECIAL_TOKENS, *tokenizer_special_tokens(tokenizer)])))
    for n, text in lines:
        _check_line(n, text, path, report, seen)
    report.file_format = next(iter(seen.formats), None)
    report.record_lines = list(seen.record_lines)
    if lines and not report.records and report.ok:
        report.error(0, "no usable example — the file must hold at least one chat")
    for other in other_paths:
        _check_overlap(report, path, Path(other), seen.record_lines)
    if tokenizer is not None and report.records:
        _check_lengths(report, tokenizer, max_seq_length, seen)
    return report


def load_records(path: str | Path) -> list[dict]:
    """Read a JSONL file in either format as canonical records; ``DatasetError`` with the full report."""
    report = validate_file(resolve_path(path))
    if not report.ok:
        raise DatasetError(report.format())
    return report.records


def check_reports(reports: Iterable[ValidationReport], allow_split_overlap: bool = False) -> list[str]:
    """Raise ``DatasetError`` with every error of the reports (notebook 01 stops on it); return warnings.

    A train/test overlap (``SPLIT_OVERLAP``) is an error too, naming the leaked ids, unless
    ``allow_split_overlap`` acknowledges it: then it comes back as a warning line.
    """
    errors, notes = [], []
    for report in reports:
        leaks = [p for p in report.errors if p.code == SPLIT_OVERLAP]
        errors += [p.format() for p in report.errors if p.code != SPLIT_OVERLAP or not allow_split_overlap]
        if leaks:
            ids = report.leaked_ids
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else f" ({len(ids)})")
            line = (f"{report.path}: train/test leak, leaked ids: {shown} — rebuild the split (`python -m "
                    "utils.data build`) or fix the files; allow_split_overlap = True acknowledges it")
            (notes if allow_split_overlap else errors).append(line)
    if errors:
        raise DatasetError("\n".join(errors))
    return notes


def convert_file(source: str | Path, target: str | Path, to: str, force: bool = False,
                 layout: TextLayout | None = None) -> Path:
    """Convert a JSONL file between formats; never writes over ``source``, nor over ``target`` unless forced.

    ``source`` is read as ``load_records`` reads it (relative to the repository root); ``target`` is compared
    with it as real files (symlinks, hard links, relative paths), and written atomically: a failure leaves
    any previous ``target`` as it was.
    """
    source, target = resolve_path(source), Path(target)
    if target.is_dir():
        raise DatasetError(f"{target}: is a directory — give the output file's path, e.g. {target / source.name}")
    if target.exists() and same_file(source, target):
        raise DatasetError(f"{target}: the output is the input file ({source}) — choose another output path "
                           "(the converter never writes over its input)")
    if target.exists() and not force:
        raise DatasetError(f"{target}: already exists — choose another output path or pass --force")
    records = load_records(source)
    try:
        return write_jsonl(records, target, to=to, layout=layout)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(f"{target}: cannot write ({reason}) — nothing was changed: any previous {target.name} "
                           "is intact; free disk space, check the folder's permissions or choose another "
                           "path") from exc
