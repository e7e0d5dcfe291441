"""The bad-input probe of issue #19: every careless or hostile input gets one clear message, and nothing is lost.

``SCENARIOS`` lists what a user did (a damaged dataset line, a setting out of range, a typo in a profile, a
second training into a finished run, ...), the callable that does it in-process, and what must happen:

- ``error``: a project exception, or a command-line exit code other than 0, whose message matches ``match``
  (the file:line, the setting or the value) and holds no "Traceback";
- ``warning``: it runs and says what is wrong (a "warning" line, a Python warning or a note matching ``match``);
- ``accepted``: legitimately fine (CRLF line endings, say).

A project exception is one whose class is defined in ``utils``; any other exception (a ``ValueError`` from
the project's own code included) is a TRACEBACK, as the user sees it. A run that goes ahead where an error was
expected is SILENT; an error whose message does not match is UNCLEAR.

Every scenario runs in its own folder with copies of the profiles; every file there (the user's dataset,
profile, checkpoints, adapter) is hashed before and after, and one whose bytes are gone (changed or deleted,
not merely moved, e.g. to ``previous/``) is DATA LOST, whatever else happened. Training stops before the
optimisation loop: ``load_training_model`` and ``build_trainer`` are replaced by stand-ins (the real
``SFTConfig`` and ``LoraConfig`` are still built) whose ``train()`` raises ``Reached``; the few scenarios in
``REAL_TRAINER`` build the real model and ``SFTTrainer`` and replace only ``Trainer.train``. The runner records
notebooks instead of executing them. Two scenarios (``slow``) start a second training process.
``tools/bad_inputs_table.py`` runs the same list and prints the table.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest

from utils import config as config_module
from utils import data as data_module
from utils import paths as paths_module
from utils import runner as runner_module
from utils.data import tokenizers as tokenizers_module
from utils.paths import PARAMS_DIR, REPO_ROOT

OUTCOMES = ("error", "warning", "accepted", "TRACEBACK", "SILENT", "UNCLEAR", "DATA LOST")
FIXTURES = Path(__file__).parent / "fixtures" / "data"
SYSTEM_PROMPT = "Sos un asistente sobre la normativa de la UTN. Respondé en español y citá la norma."


# --------------------------------------------------------------------------------------------
# Scenarios and their results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One thing a user did, and what must happen."""

    id: str
    area: str
    what: str  # what the user did, in words
    act: Callable[[Path], Any]  # does it in-process inside the folder ``work``; an int return is an exit code
    expect: tuple[str, ...]  # acceptable outcomes: "error", "warning", "accepted"
    match: str = ""  # regex an error or warning message must match
    setup: Callable[[Path], None] | None = None  # writes the user's files into ``work`` (hashed afterwards)
    may_change: tuple[str, ...] = ()  # files (relative to ``work``) the user asked to be written over
    check: Callable[[Path, "Result"], str | None] | None = None  # extra condition; returns what is wrong
    slow: bool = False


@dataclass
class Result:
    """What a scenario did: its outcome, the message a user reads, and the raw output."""

    outcome: str = "accepted"
    message: str = ""
    stdout: str = ""
    stderr: str = ""
    returncode: int = 0
    exception: str = ""
    reached: dict[str, Any] = field(default_factory=dict)  # what the training stand-in was called with
    notebooks: list[str] = field(default_factory=list)  # notebooks the runner would have executed
    lost: list[str] = field(default_factory=list)
    problem: str = ""  # why the scenario fails ("" when it passes)

    @property
    def ok(self) -> bool:
        return not self.problem


class Reached(Exception):
    """Raised by the training stand-in: the run got as far as ``trainer.train()``."""


# --------------------------------------------------------------------------------------------
# Stand-ins: no weights loaded, no notebook executed, nothing written outside the scenario's folder
# --------------------------------------------------------------------------------------------

TRACE: dict[str, Any] = {}


class FakeTrainer:
    """What ``build_trainer`` returns: the real ``SFTConfig``/``LoraConfig``, and a ``train()`` that stops."""

    def __init__(self, settings, plan):
        from utils.training.model import build_sft_config, build_training_lora_config

        self.lora = build_training_lora_config(settings)
        self.args = build_sft_config(settings, plan)
        self.model = None

    def add_callback(self, callback) -> None:
        pass

    def train(self, resume_from_checkpoint=None, **kwargs):
        TRACE["resume_from"] = str(resume_from_checkpoint) if resume_from_checkpoint else None
        hold = os.environ.get("BAD_INPUTS_HOLD")  # the concurrent-run scenarios keep this run busy
        if hold:
            Path(hold, "started").write_text("1")
            deadline = time.monotonic() + 120
            while not Path(hold, "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        raise Reached(TRACE.get("resume_from"))


def _fake_model(settings, plan):
    TRACE["settings"] = settings
    return object()


def _fake_build_trainer(settings, plan, model, tokenizer, data, callbacks=None):
    TRACE["train_records"] = len(getattr(data, "train_records", []) or [])
    return FakeTrainer(settings, plan)


def _fake_run_notebook(notebook, output, parameters, log_output, progress=None):
    TRACE.setdefault("notebooks", []).append(Path(notebook).name[:2])
    TRACE.setdefault("parameters", {})[Path(notebook).name[:2]] = dict(parameters)


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any):
    """Set ``target.name`` for the block (a missing attribute is added, then removed)."""
    missing = object()
    old = getattr(target, name, missing)
    setattr(target, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(target, name)
        else:
            setattr(target, name, old)


@lru_cache(maxsize=None)
def _declared(path: str, mtime: float) -> frozenset:
    return frozenset(_REAL_DECLARED(Path(path)))


_REAL_DECLARED = runner_module.declared_parameters


def _cached_declared(notebook: Path) -> set[str]:
    """``declared_parameters`` read once per notebook (papermill's inspection is slow)."""
    return set(_declared(str(notebook), Path(notebook).stat().st_mtime))


_TOKENIZERS: dict[str, Any] = {}


def _cached_tokenizer(name: str = "embedded"):
    """The validator's tokenizers loaded once per name (it only reads them; loading takes about a second)."""
    if name not in _TOKENIZERS:
        from utils.modeling import load_tokenizer

        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


@contextlib.contextmanager
def sandbox(work: Path, stop_at: str = "model"):
    """Profiles read from ``work/params``, runs under ``work/runs`` (published: ``work/figures``, ``work/results``),
    the stand-ins, the hub offline."""
    from utils.training import run as run_module

    TRACE.clear()
    old_env, old_cwd = dict(os.environ), os.getcwd()
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(config_module, "PARAMS_DIR", work / "params"))
        stack.enter_context(patched(runner_module, "run_notebook", _fake_run_notebook))
        stack.enter_context(patched(runner_module, "declared_parameters", _cached_declared))
        # runs/, figures/ and results/ of the work folder, for the runner and for --publish (paths' functions read
        # these at call time): a scenario never reads or writes the repository's own
        for name, folder in (("RUNS_DIR", "runs"), ("FIGURES_DIR", "figures"), ("RESULTS_DIR", "results")):
            stack.enter_context(patched(paths_module, name, work / folder))
        stack.enter_context(patched(tokenizers_module, "load_tokenizer", _cached_tokenizer))
        if stop_at == "model":
            stack.enter_context(patched(run_module, "load_training_model", _fake_model))
            stack.enter_context(patched(run_module, "build_trainer", _fake_build_trainer))
        else:  # the real model and trainer; only the optimisation loop is skipped
            from transformers import Trainer

            stack.enter_context(patched(Trainer, "train", lambda self, *a, **k: FakeTrainer.train(self, *a, **k)))
        try:
            yield
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)


# --------------------------------------------------------------------------------------------
# Running one scenario
# --------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def lost_files(before: dict[str, str], after: dict[str, str], may_change: tuple[str, ...] = ()) -> list[str]:
    """Files whose bytes are gone: changed or deleted, and not moved (the same bytes elsewhere, e.g. previous/)."""
    spare = Counter(h for p, h in after.items() if before.get(p) != h)  # bytes that appeared under a new path
    lost = []
    for path, digest in before.items():
        if after.get(path) == digest or path in may_change:
            continue
        if spare[digest]:
            spare[digest] -= 1
        else:
            lost.append(path)
    return lost


def _is_project_error(exc: BaseException) -> bool:
    """A project exception: its class is defined in ``utils``."""
    return type(exc).__module__.split(".")[0] == "utils"


def _message_lines(result: Result, caught: list) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) a user reads, from the exception, stderr, stdout and Python warnings."""
    text = "\n".join(filter(None, [result.exception, result.stderr, result.stdout]))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.I)]
    warns = [line for line in lines if re.search(r"\bwarning\b|\bnote:", line, re.I)]
    warns += [f"{w.category.__name__}: {w.message}" for w in caught
              if not issubclass(w.category, (DeprecationWarning, FutureWarning, ResourceWarning))
              and "site-packages" not in str(w.filename)]
    return errors or lines, warns


def _classify(sc: Scenario, result: Result, raised: BaseException | None, caught: list) -> None:
    """Set ``outcome``, ``message`` and ``problem`` of a result."""
    errors, warns = _message_lines(result, caught)
    raw = raised is not None and not isinstance(raised, (Reached, SystemExit)) and not _is_project_error(raised)
    if result.lost:
        result.outcome, result.message = "DATA LOST", "changed or deleted: " + ", ".join(result.lost)
    elif raw or "Traceback (most recent call last)" in result.stderr + result.stdout:
        result.outcome, result.message = "TRACEBACK", result.exception or result.stderr.strip().splitlines()[-1]
    elif (raised is not None and _is_project_error(raised)) or result.returncode not in (0, None):
        result.outcome = "error"
        hit = [line for line in errors if sc.match and re.search(sc.match, line)]
        result.message = (hit or errors or [f"exit code {result.returncode}"])[0]
    else:
        hit = [line for line in warns if sc.match and re.search(sc.match, line)]
        shown = [line for line in warns if not line.lower().startswith("note:")]
        result.outcome = "warning" if hit or shown else "accepted"
        result.message = (hit or shown or [_ran(result)])[0]
    _judge(sc, result)


def _ran(result: Result) -> str:
    if result.notebooks:
        return f"runner would execute notebooks {', '.join(result.notebooks)}"
    if "resume_from" in result.reached:
        return f"training started (resume_from={result.reached['resume_from']})"
    return "no message" if not result.stdout.strip() else result.stdout.strip().splitlines()[-1]


def _judge(sc: Scenario, result: Result) -> None:
    """Whether the outcome is one the scenario accepts; rename a miss to SILENT or UNCLEAR."""
    outcome = result.outcome
    if outcome in ("TRACEBACK", "DATA LOST"):
        result.problem = outcome
        return
    matched = not sc.match or re.search(sc.match, result.message) is not None
    if outcome in sc.expect and (outcome == "accepted" or matched):
        return
    if outcome == "error":
        result.outcome = "UNCLEAR" if "error" in sc.expect else "error"
        result.problem = f"error, expected {'/'.join(sc.expect)} matching {sc.match!r}"
    else:
        result.outcome = "SILENT" if "accepted" not in sc.expect or not matched else outcome
        result.problem = f"{outcome}, expected {'/'.join(sc.expect)} matching {sc.match!r}"


def perform(sc: Scenario, work: Path) -> Result:
    """Run one scenario inside ``work`` and classify what happened."""
    work.mkdir(parents=True, exist_ok=True)
    base_profiles(work)
    with sandbox(work, "train" if sc.id in REAL_TRAINER else "model"):
        if sc.setup:
            sc.setup(work)
        before = snapshot(work)
        result, raised, caught = _call(sc, work)
    result.lost = lost_files(before, snapshot(work), sc.may_change)
    _classify(sc, result, raised, caught)
    if sc.check and not result.problem:
        result.problem = sc.check(work, result) or ""
        if result.problem:
            result.outcome = "SILENT"
    return result


def _call(sc: Scenario, work: Path) -> tuple[Result, BaseException | None, list]:
    """Call the scenario's act, capturing its output, warnings, exit code and exception."""
    out, err, result, raised = io.StringIO(), io.StringIO(), Result(), None
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            value = sc.act(work)
            result.returncode = value if isinstance(value, int) and not isinstance(value, bool) else 0
        except SystemExit as exc:
            result.returncode = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            raised = exc
        except Reached as exc:
            raised = exc
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
            raised = exc
            first = f"{type(exc).__name__}: {exc}"
            result.exception = first if _is_project_error(exc) else traceback.format_exc() + first
    result.stdout, result.stderr = out.getvalue(), err.getvalue()
    result.reached = {k: TRACE[k] for k in ("resume_from", "train_records") if k in TRACE}
    result.notebooks = list(TRACE.get("notebooks", []))
    if result.exception and not _is_project_error(raised):
        result.exception = result.exception.strip().splitlines()[-1]
        result.stderr += "\nTraceback (most recent call last): (raised in-process)"
    return result, raised, caught


def base_profiles(work: Path) -> None:
    """Copies of the shipped profiles in ``work/params`` (scenarios edit the copies)."""
    (work / "params").mkdir(exist_ok=True)
    for path in PARAMS_DIR.glob("*.yaml"):
        shutil.copyfile(path, work / "params" / path.name)


# Scenarios that need the real model and SFTTrainer (what they check happens while the trainer is built).
REAL_TRAINER: set[str] = set()

# --------------------------------------------------------------------------------------------
# Building blocks: records, files, commands
# --------------------------------------------------------------------------------------------


def chat(question: str, answer: str, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """A system (optional), user, assistant chat."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def rec(i: int, **extra: Any) -> dict:
    """A valid messages-format record whose question is unique to ``i``."""
    record = {"id": f"r{i}", "messages": chat(f"¿Qué establece la Ord. {1000 + i} sobre el tema {i}?",
                                               f"La Ord. {1000 + i} establece la regla número {i}.")}
    record.update(extra)
    return record


def msgs(*turns: tuple[Any, Any]) -> dict:
    """A record with the given (role, content) turns."""
    return {"id": "bad", "messages": [{"role": r, "content": c} for r, c in turns]}


def jsonl(*objs: Any) -> bytes:
    """JSONL bytes: dicts as JSON lines, strings as they are."""
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs).encode()


def text_rec(text: str) -> dict:
    return {"text": text}


LLAMA_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM_PROMPT + "<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n¿Qué es la Ord. 1549?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nEl reglamento de estudios.<|eot_id|>")
LONG_ANSWER = " ".join(f"El artículo {i} de la Ord. 1549 establece una condición distinta." for i in range(450))


def put(*files: tuple[str, bytes | str]) -> Callable[[Path], None]:
    """A setup that writes ``files`` (relative path, content) into ``work``."""
    def setup(work: Path) -> None:
        for name, content in files:
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def split_files(train: list, test: list) -> Callable[[Path], None]:
    return put(("train.jsonl", jsonl(*train)), ("test.jsonl", jsonl(*test)))


GOOD_TRAIN = [rec(i) for i in range(1, 7)]
NO_SYSTEM = [{"id": f"n{i}", "messages": chat(f"¿Pregunta {i}?", f"Respuesta {i}.", system=None)} for i in range(6)]
GOOD_TEST = [rec(i) for i in range(50, 52)]


def cli(main: Callable[[list[str]], int], *args: str) -> Callable[[Path], int]:
    """An act that calls ``main(argv)`` with ``{work}`` replaced by the scenario's folder."""
    def act(work: Path) -> int:
        return main([a.format(work=work) for a in args])
    return act


def data_main(argv: list[str]) -> int:
    return data_module.main(argv)


def training_main(argv: list[str]) -> int:
    from utils.training.cli import main

    return main(argv)


def runner_main(argv: list[str]) -> int:
    return runner_module.main(argv)


def exact(*names: str) -> str:
    """A regex that needs every one of ``names`` (any order) on the message line."""
    return "".join(f"(?=.*{n})" for n in names)


# --------------------------------------------------------------------------------------------
# Dataset files: validate, load_records
# --------------------------------------------------------------------------------------------

VALIDATE = "dataset: validate"


def bad_line(sid: str, what: str, line: Any, match: str, expect: tuple[str, ...] = ("error",)) -> Scenario:
    """Line 2 of data.jsonl is damaged (lines 1 and 3 are fine): the message names data.jsonl:2."""
    return Scenario(sid, VALIDATE, what, cli(data_main, "validate", "{work}/data.jsonl"), expect,
                    rf"(?i)data\.jsonl:2\b.*(?:{match})", put(("data.jsonl", jsonl(rec(1), line, rec(3)))))


def whole_file(sid: str, what: str, content: bytes, match: str, expect: tuple[str, ...] = ("error",),
               args: tuple[str, ...] = ()) -> Scenario:
    """data.jsonl holds ``content``; the message names the file."""
    return Scenario(sid, VALIDATE, what, cli(data_main, "validate", *args, "{work}/data.jsonl"), expect,
                    rf"(?i)data\.jsonl.*(?:{match})", put(("data.jsonl", content)))


SPECIAL_TOKENS = ["<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|endoftext|>", "<|begin_of_text|>"]
GOOD_PAIR = ("¿Qué es la Ord. 1549?", "El reglamento de estudios.")

LINE_DAMAGE = [
    ("json-truncated", "a line cut in the middle of an object", '{"messages": [{"role": "user", "content": "ho',
     "invalid JSON"),
    ("json-trailing-comma", "a trailing comma after the last field", '{"messages": [], }', "invalid JSON"),
    ("json-single-quotes", "Python dict syntax with single quotes", "{'messages': []}", "invalid JSON"),
    ("json-control-char", "a raw control character inside a string", '{"messages": "a\x01b"}', "invalid JSON"),
    ("json-array-line", "a JSON list instead of an object", [rec(2)], "list|not an object"),
    ("json-string-line", "a bare JSON string", '"hola"', "str|not an object"),
    ("json-number-line", "a bare number", "42", "int|not an object"),
    ("json-null-line", "null", "null", "NoneType|null|not an object"),
    ("messages-missing", "question/answer keys instead of messages",
     {"id": "x", "question": "¿Qué?", "answer": "Eso."}, "missing field 'messages'"),
    ("messages-typo", "'mesages' instead of 'messages'", {"mesages": chat(*GOOD_PAIR)}, "messages"),
    ("messages-string", "messages given as one string", {"messages": "hola"}, "messages"),
    ("messages-empty", "an empty messages list", {"messages": []}, "messages"),
    ("messages-object", "messages as one object, not a list", {"messages": {"role": "user", "content": "x"}},
     "messages"),
    ("message-not-object", "a turn written as a plain string",
     {"messages": ["hola", {"role": "assistant", "content": "x"}]}, "message 1"),
    ("role-missing", "a turn without 'role'", {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
     "role"),
    ("role-empty", "role ''", msgs(("", "¿Qué?"), ("assistant", "Eso.")), "role"),
    ("role-unknown", "role 'bot'", msgs(("user", "¿Qué?"), ("bot", "Eso.")), "unknown role 'bot'"),
    ("role-capitalised", "role 'User'", msgs(("User", "¿Qué?"), ("assistant", "Eso.")), "'User'"),
    ("role-number", "role 1", msgs((1, "¿Qué?"), ("assistant", "Eso.")), "role"),
    ("content-missing", "a turn without 'content'", {"messages": [{"role": "user"}, {"role": "assistant",
                                                                                   "content": "x"}]}, "content"),
    ("content-null", "content null", msgs(("user", None), ("assistant", "Eso.")), "content"),
    ("content-number", "content 42", msgs(("user", 42), ("assistant", "Eso.")), "content"),
    ("content-parts", "content as a list of parts (OpenAI style)",
     msgs(("user", [{"type": "text", "text": "¿Qué?"}]), ("assistant", "Eso.")), "content"),
    ("content-empty", "an empty answer", msgs(("user", "¿Qué?"), ("assistant", "")), "empty"),
    ("content-blank", "an answer of spaces", msgs(("user", "¿Qué?"), ("assistant", "   \n ")), "empty"),
    ("order-assistant-first", "the assistant speaks first",
     msgs(("assistant", "Hola."), ("user", "¿Qué?"), ("assistant", "Eso.")), "out of order"),
    ("order-two-users", "two user turns in a row", msgs(("user", "¿Qué?"), ("user", "¿Y?"), ("assistant", "Eso.")),
     "out of order"),
    ("order-system-middle", "a system turn in the middle",
     msgs(("user", "¿Qué?"), ("system", SYSTEM_PROMPT), ("assistant", "Eso.")), "out of order"),
    ("order-ends-with-user", "the chat ends with a user turn",
     msgs(("user", "¿Qué?"), ("assistant", "Eso."), ("user", "¿Y?")), "out of order|end"),
    ("no-assistant", "no assistant turn", msgs(("system", SYSTEM_PROMPT), ("user", "¿Qué?")), "no assistant"),
    ("only-system", "only a system turn", msgs(("system", SYSTEM_PROMPT)), "no assistant"),
    ("kind-unknown", "kind 'hecho'", rec(2, kind="hecho"), "kind"),
    ("keywords-string", "keywords as one string", rec(2, keywords="ordenanza"), "keywords"),
    ("facts-numbers", "facts as numbers", rec(2, facts=[1, 2]), "facts"),
    ("id-empty", "an empty id", rec(2, id=""), "'id'"),
    ("id-object", "an id that is an object", rec(2, id={"n": 2}), "'id'"),
    ("topic-list", "a topic that is a list", rec(2, topic=["a"]), "topic"),
    ("id-infinite", "id 1e999 (infinite once parsed)", '{"id": 1e999, "messages": ' + json.dumps(chat(*GOOD_PAIR))
     + "}", "'id'|infinit|number"),
    ("id-nan", "id NaN (not JSON, Python accepts it)", '{"id": NaN, "messages": ' + json.dumps(chat(*GOOD_PAIR))
     + "}", "'id'|NaN"),
    ("id-huge-integer", "an id of 5,000 digits", '{"id": 1' + "0" * 5000 + ', "messages": '
     + json.dumps(chat(*GOOD_PAIR)) + "}", "number|digit|integer|too (long|large|big)"),
    ("nested-deep", "a JSON nested 100,000 levels deep", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}",
     "nest|deep|recursion"),
    ("lone-surrogate", "a lone surrogate (\\ud800) escaped in the answer",
     '{"messages": [{"role": "user", "content": "¿Qué?"}, {"role": "assistant", "content": "a\\ud800b"}]}',
     "surrogate|UTF-8|encod"),
    ("both-formats", "both 'messages' and 'text'", {"messages": chat(*GOOD_PAIR), "text": LLAMA_TEXT}, "both"),
    ("mixed-format", "line 2 in the text format, line 1 in messages", text_rec(LLAMA_TEXT), "format"),
    ("duplicate-exact", "line 2 repeats line 1", rec(1, id="r1b"), "duplicate"),
    ("duplicate-question", "the same question with another answer",
     {"id": "q", "messages": chat(rec(1)["messages"][1]["content"], "Otra respuesta.")}, "same question"),
    ("duplicate-id", "an id used twice", rec(2, id="r1"), "already used"),
]
for _tok in SPECIAL_TOKENS:
    _name = re.sub(r"\W+", "-", _tok).strip("-")
    LINE_DAMAGE.append((f"special-token-{_name}", f"{_tok} inside an answer",
                        msgs(("user", "¿Qué?"), ("assistant", f"Eso.{_tok}Otra cosa.")),
                        rf"{re.escape(_tok)}|special token"))
LINE_DAMAGE.append(("special-token-in-system", "<|im_end|> inside the system prompt",
                    msgs(("system", "Sos un asistente.<|im_end|>"), ("user", "¿Qué?"), ("assistant", "Eso.")),
                    r"<\|im_end\|>|special token"))

TEXT_DAMAGE = [
    ("text-empty", "an empty 'text'", text_rec(""), "text"),
    ("text-number", "'text' is a number", text_rec(7), "text"),
    ("text-no-header", "plain prose in 'text'", text_rec("Hola, ¿qué tal?"), "header"),
    ("text-broken-header", "a header not closed by <|end_header_id|>",
     text_rec(LLAMA_TEXT.replace("user<|end_header_id|>", "user<|end_header|>")), "end_header_id"),
    ("text-unclosed-turn", "the answer not closed by <|eot_id|>", text_rec(LLAMA_TEXT[: -len("<|eot_id|>")]),
     "not closed|eot_id"),
    ("text-unknown-marker", "<|eot|> instead of <|eot_id|>",
     text_rec(LLAMA_TEXT.replace("Ord. 1549?<|eot_id|>", "Ord. 1549?<|eot|>")), "eot"),
    ("text-bos-middle", "<|begin_of_text|> in the middle", text_rec(LLAMA_TEXT + "<|begin_of_text|>"),
     "begin_of_text"),
    ("text-prose-before-header", "prose before the first header",
     text_rec("Hola " + LLAMA_TEXT.replace("<|begin_of_text|>", "")), "before|header"),
    ("text-im-end", "<|im_end|> inside a text-format answer",
     text_rec(LLAMA_TEXT.replace("estudios.", "estudios.<|im_end|>")), r"im_end|special|marker"),
]


def text_line(sid: str, what: str, obj: Any, match: str) -> Scenario:
    """Line 2 of a text-format file is damaged."""
    good = text_rec(LLAMA_TEXT)
    other = text_rec(LLAMA_TEXT.replace("¿Qué es la Ord. 1549?", "¿Qué es la Ord. 908?"))
    return Scenario(sid, "dataset: text format", what, cli(data_main, "validate", "{work}/data.jsonl"), ("error",),
                    rf"(?i)data\.jsonl:2\b.*(?:{match})", put(("data.jsonl", jsonl(good, obj, other))))


GOOD_FILE = jsonl(rec(1), rec(2))
UTF16_FILE = "\ufeff".encode("utf-16-le") + GOOD_FILE.decode().encode("utf-16-le")


GZIP_BYTES = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(200, 256)) * 4
FILE_DAMAGE = [
    whole_file("file-empty", "an empty file (0 bytes)", b"", "empty"),
    whole_file("file-whitespace", "a file of spaces and newlines", b"  \n\n \n", "empty"),
    whole_file("file-bom", "a UTF-8 byte-order mark", b"\xef\xbb\xbf" + GOOD_FILE, "BOM|byte-order",
               ("warning", "accepted")),
    whole_file("file-crlf", "Windows line endings (CRLF)", GOOD_FILE.replace(b"\n", b"\r\n"), "CRLF",
               ("accepted", "warning")),
    whole_file("file-bom-crlf", "BOM and CRLF together", b"\xef\xbb\xbf" + GOOD_FILE.replace(b"\n", b"\r\n"),
               "BOM|byte-order|CRLF", ("warning", "accepted")),
    whole_file("file-no-final-newline", "no newline after the last line", GOOD_FILE.rstrip(b"\n"), "",
               ("accepted",)),
    whole_file("file-blank-line", "a blank line between examples", jsonl(rec(1), "", rec(2)), "empty line",
               ("warning", "accepted")),
    whole_file("file-utf16-le", "saved as UTF-16 LE with BOM", "\ufeff".encode("utf-16-le")
               + GOOD_FILE.decode().encode("utf-16-le"), "UTF-16"),
    whole_file("file-utf16-be", "saved as UTF-16 BE with BOM", "\ufeff".encode("utf-16-be")
               + GOOD_FILE.decode().encode("utf-16-be"), "UTF-16"),
    whole_file("file-utf16-nobom", "saved as UTF-16 LE without BOM", GOOD_FILE.decode().encode("utf-16-le"),
               "UTF-16|NUL|null byte"),
    whole_file("file-latin1", "saved as Latin-1", GOOD_FILE.decode().encode("latin-1"), "UTF-8"),
    whole_file("file-cp1252-quotes", "Windows-1252 curly quotes in an answer",
               jsonl(rec(1)) + '{"messages": [{"role": "user", "content": "\x93Qu\xe9\x94"}]}\n'.encode("latin-1"),
               "UTF-8"),
    whole_file("file-gzip", "a gzip-compressed file given as JSONL", GZIP_BYTES, "gzip|compress|binary"),
    whole_file("file-json-array", "one JSON array holding every example (not JSONL)",
               json.dumps([rec(1), rec(2)], indent=2).encode(), "JSON|object|list"),
    whole_file("file-pretty-json", "one example pretty-printed over many lines",
               json.dumps(rec(1), indent=2, ensure_ascii=False).encode(), "invalid JSON|JSON"),
    whole_file("file-yaml", "a YAML file given as JSONL", b"- messages:\n  - role: user\n    content: hola\n",
               "JSON"),
    whole_file("file-csv", "a CSV file given as JSONL", "pregunta,respuesta\n¿Qué?,Eso.\n".encode(), "JSON"),
    Scenario("file-directory", VALIDATE, "a directory given as the file", cli(data_main, "validate", "{work}/data"),
             ("error",), r"(?i)data.*director", put(("data/a.jsonl", GOOD_FILE))),
    Scenario("file-missing", VALIDATE, "a file that does not exist", cli(data_main, "validate", "{work}/nope.jsonl"),
             ("error",), r"(?i)nope\.jsonl.*(not found|no such|does not exist)"),
    Scenario("leak-train-test", "dataset: splits", "a test question also in train",
             cli(data_main, "validate", "{work}/train.jsonl", "{work}/test.jsonl"), ("error",),
             r"(?i)train\.jsonl:\d+.*test\.jsonl|test\.jsonl:\d+.*train\.jsonl",
             split_files(GOOD_TRAIN, [rec(3), rec(60)])),
    Scenario("leak-normalised", "dataset: splits", "the same test question with other accents and punctuation",
             cli(data_main, "validate", "{work}/train.jsonl", "{work}/test.jsonl"), ("error",),
             r"(?i)train\.jsonl:\d+.*test\.jsonl|test\.jsonl:\d+.*train\.jsonl",
             split_files(GOOD_TRAIN, [{"id": "t", "messages": chat("que establece la ord 1003 sobre el tema 3",
                                                                      "Otra cosa.")}])),
    Scenario("same-file-twice", "dataset: splits", "the same file given as train and test",
             cli(data_main, "validate", "{work}/train.jsonl", "{work}/train.jsonl"), ("error", "warning"),
             r"(?i)same file|twice|both|itself", put(("train.jsonl", jsonl(*GOOD_TRAIN)))),
    Scenario("too-long-readme-command", "dataset: lengths",
             "a 4,000-token answer, validated with the README's command (no --tokenizer)",
             cli(data_main, "validate", "{work}/data.jsonl"), ("warning", "error"),
             r"(?i)data\.jsonl:2.*(token|max_seq_length|trunc)",
             put(("data.jsonl", jsonl(rec(1), msgs(("user", "¿Qué dice?"), ("assistant", LONG_ANSWER)))))),
    Scenario("too-long-tokenizer", "dataset: lengths", "an answer past --max-seq-length 256 (--tokenizer embedded)",
             cli(data_main, "validate", "--tokenizer", "embedded", "--max-seq-length", "256", "{work}/data.jsonl"),
             ("warning", "error"), r"(?i)data\.jsonl:2.*max_seq_length",
             put(("data.jsonl", jsonl(rec(1), msgs(("user", "¿Qué dice?"), ("assistant", LONG_ANSWER)))))),
    Scenario("too-long-system-prompt", "dataset: lengths",
             "a system prompt longer than max_seq_length (the whole example would be dropped)",
             cli(data_main, "validate", "--tokenizer", "embedded", "--max-seq-length", "128", "{work}/data.jsonl"),
             ("error", "warning"), r"(?i)data\.jsonl:2.*(prompt|drop|max_seq_length)",
             put(("data.jsonl", jsonl(rec(1), {"messages": chat("¿Qué?", "Eso.", system=LONG_ANSWER)})))),
    Scenario("max-seq-length-zero", VALIDATE, "validate --max-seq-length 0",
             cli(data_main, "validate", "--tokenizer", "embedded", "--max-seq-length", "0", "{work}/data.jsonl"),
             ("error",), r"(?i)max.seq.length", put(("data.jsonl", GOOD_FILE))),
    Scenario("max-seq-length-negative", VALIDATE, "validate --max-seq-length -5",
             cli(data_main, "validate", "--max-seq-length", "-5", "{work}/data.jsonl"),
             ("error",), r"(?i)max.seq.length", put(("data.jsonl", GOOD_FILE))),
    Scenario("tokenizer-unknown", VALIDATE, "validate --tokenizer with a model that is not here",
             cli(data_main, "validate", "--tokenizer", "nobody/no-such-model", "{work}/data.jsonl"),
             ("error",), r"(?i)tokenizer|no-such-model", put(("data.jsonl", GOOD_FILE))),
    Scenario("validate-no-file", VALIDATE, "validate with no file", cli(data_main, "validate"), ("error",),
             r"(?i)files|argument"),
    Scenario("data-unknown-command", VALIDATE, "python -m utils.data check data.jsonl (no such command)",
             cli(data_main, "check", "{work}/data.jsonl"), ("error",), r"(?i)invalid choice|check"),
]


def load(name: str) -> Callable[[Path], Any]:
    """An act that calls ``load_records`` on ``work/name`` (the training and notebook 01 path)."""
    def act(work: Path) -> None:
        data_module.load_records(work / name)
    return act


LOAD = "dataset: load_records"
LOAD_RECORDS = [
    Scenario("load-invalid-line", LOAD, "load_records on a file with a broken line 2", load("data.jsonl"), ("error",),
             r"(?i)data\.jsonl:2", put(("data.jsonl", jsonl(rec(1), "{oops", rec(3))))),
    Scenario("load-directory", LOAD, "load_records on a directory", load("data"), ("error",), r"(?i)director",
             put(("data/x.jsonl", GOOD_FILE))),
    Scenario("load-missing", LOAD, "load_records on a missing file", load("nope.jsonl"), ("error",),
             r"(?i)nope\.jsonl.*(not found|no such|does not exist)"),
    Scenario("load-utf16", LOAD, "load_records on a UTF-16 file", load("data.jsonl"), ("error",), r"UTF-16",
             put(("data.jsonl", UTF16_FILE))),
    Scenario("load-nested", LOAD, "load_records on a line nested 100,000 levels", load("data.jsonl"), ("error",),
             r"(?i)data\.jsonl:1.*(nest|deep|recursion)",
             put(("data.jsonl", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n"))),
    Scenario("load-special-token", LOAD, "load_records on an answer holding <|eot_id|>", load("data.jsonl"),
             ("error",), r"(?i)data\.jsonl:1.*(eot_id|special)",
             put(("data.jsonl", jsonl(msgs(("user", "¿Qué?"), ("assistant", "Sí.<|eot_id|>Fin.")))))),
    Scenario("load-fixture-ten-damages", LOAD, "load_records on the ten-damages fixture", load("ten.jsonl"),
             ("error",), r"(?i)ten\.jsonl:\d+",
             lambda work: shutil.copyfile(FIXTURES / "ten_damages.jsonl", work / "ten.jsonl")),
]

# --------------------------------------------------------------------------------------------
# Building the split (python -m utils.data build, written into the scenario's folder) and notebook 01's check
# --------------------------------------------------------------------------------------------

BUILD = "dataset: build"


def build(*args: str) -> Callable[[Path], int]:
    """``python -m utils.data build ARGS`` with the split files and README under ``work/dataset``."""
    def act(work: Path) -> int:
        from functools import partial

        from utils.data import cli as data_cli, corpus

        out = work / "dataset"
        sandboxed = partial(corpus.build_dataset, train_path=out / "train.jsonl", test_path=out / "test.jsonl",
                            validation_path=out / "validation.jsonl", readme=out / "README.md")
        with patched(data_cli, "build_dataset", sandboxed), patched(data_cli, "README_FILE", out / "README.md"):
            if (work / "ro").exists():
                with read_only(out):
                    return data_module.main(["build", *[a.format(work=work) for a in args]])
            return data_module.main(["build", *[a.format(work=work) for a in args]])
    return act


def dataset_copy(work: Path) -> None:
    """The shipped split files and datasheet, copied to ``work/dataset`` (a failed build must leave them)."""
    (work / "dataset").mkdir(exist_ok=True)
    for name, target in (("utn_sample_train.jsonl", "train.jsonl"), ("utn_sample_validation.jsonl", "validation.jsonl"),
                         ("utn_sample_test.jsonl", "test.jsonl"), ("README.md", "README.md")):
        shutil.copyfile(REPO_ROOT / "dataset" / name, work / "dataset" / target)


def with_copy(*files: tuple[str, bytes | str]) -> Callable[[Path], None]:
    return lambda work: (dataset_copy(work), put(*files)(work))


BUILDS = [
    Scenario("build-test-fraction-1.5", BUILD, "build --test-fraction 1.5", build("--test-fraction", "1.5"),
             ("error",), exact("test.fraction", r"1\.5"), dataset_copy),
    Scenario("build-test-fraction-0", BUILD, "build --test-fraction 0", build("--test-fraction", "0"), ("error",),
             r"test.fraction", dataset_copy),
    Scenario("build-test-fraction-negative", BUILD, "build --test-fraction -0.1", build("--test-fraction", "-0.1"),
             ("error",), r"test.fraction", dataset_copy),
    Scenario("build-corpus-missing", BUILD, "build --corpus that does not exist",
             build("--corpus", "{work}/nope.yaml"), ("error",), r"nope\.yaml", dataset_copy),
    Scenario("build-corpus-bad-yaml", BUILD, "build from a corpus YAML with a syntax error",
             build("--corpus", "{work}/c.yaml"), ("error",), r"c\.yaml", with_copy(("c.yaml", "facts: [unclosed\n"))),
    Scenario("build-corpus-empty", BUILD, "build from an empty corpus YAML", build("--corpus", "{work}/c.yaml"),
             ("error",), r"c\.yaml|system_prompt|empty", with_copy(("c.yaml", ""))),
    Scenario("build-read-only", BUILD, "build into a read-only dataset folder (the old split must survive)",
             build(), ("error",), r"(?i)read-only|cannot write|permission",
             lambda work: (dataset_copy(work), (work / "ro").mkdir())),
    Scenario("build-ok", BUILD, "build with the defaults (rewrites the split, as asked)", build(), ("accepted",), "",
             dataset_copy, ("dataset/train.jsonl", "dataset/validation.jsonl", "dataset/test.jsonl", "dataset/README.md")),
]


def notebook01_check(allow: bool) -> Callable[[Path], None]:
    """Notebook 01's validation cell: both splits validated against each other, then ``check_reports``."""
    def act(work: Path) -> None:
        train, test = work / "train.jsonl", work / "test.jsonl"
        reports = [data_module.validate_file(train, other_paths=[test]),
                   data_module.validate_file(test, other_paths=[train])]
        for note in data_module.check_reports(reports, allow_split_overlap=allow):
            print(f"warning: {note}")
    return act


NOTEBOOK01 = [
    Scenario("nb01-leak", "notebook 01", "notebook 01 on a train/test split that leaks a question",
             notebook01_check(False), ("error",), r"(?i)leak|same question",
             split_files(GOOD_TRAIN, [rec(2), rec(60)])),
    Scenario("nb01-leak-acknowledged", "notebook 01", "the same leak with allow_split_overlap = True",
             notebook01_check(True), ("warning",), r"(?i)leak", split_files(GOOD_TRAIN, [rec(2), rec(60)])),
]


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------

CONVERT = "convert"


def conv(sid: str, what: str, args: tuple[str, ...], expect: tuple[str, ...], match: str,
         setup: Callable[[Path], None] | None = None, **kwargs: Any) -> Scenario:
    return Scenario(sid, CONVERT, what, cli(data_main, "convert", *args), expect, match,
                    setup or put(("d.jsonl", GOOD_FILE)), **kwargs)


def hard_link(work: Path) -> None:
    put(("d.jsonl", GOOD_FILE))(work)
    os.link(work / "d.jsonl", work / "link.jsonl")


def sym_link(work: Path) -> None:
    put(("d.jsonl", GOOD_FILE))(work)
    (work / "link.jsonl").symlink_to(work / "d.jsonl")


def convert_from_dataset_folder(work: Path) -> int:
    """``cd dataset && python -m utils.data convert dataset/d.jsonl d.jsonl --force`` (repo root = ``work``)."""
    with patched(paths_module, "REPO_ROOT", work):
        os.chdir(work / "dataset")
        return data_module.main(["convert", "dataset/d.jsonl", "d.jsonl", "--to", "text", "--force"])


@contextlib.contextmanager
def disk_full(limit: int = 4096):
    """Writes past ``limit`` bytes fail (EFBIG, "File too large"), as a full disk stops them half-way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def convert_disk_full(work: Path) -> int:
    """``convert --force`` over an existing output while the disk fills up (a 4 KiB file-size limit)."""
    with disk_full():
        return data_module.main(["convert", str(work / "big.jsonl"), str(work / "out.jsonl"), "--to", "text",
                                 "--force"])


@contextlib.contextmanager
def read_only(folder: Path):
    """Make writes under ``folder`` fail with EROFS, as on a read-only mount (the tests run as root)."""
    folder = str(folder)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def refuse(path: Any) -> None:
        if str(os.path.abspath(os.fspath(path))).startswith(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    with patched(builtins, "open", fake_open), patched(io, "open", fake_open), \
            patched(os, "open", fake_os_open), patched(os, "mkdir", fake_mkdir):
        yield


def convert_read_only(work: Path) -> int:
    with read_only(work / "ro"):
        return data_module.main(["convert", str(work / "d.jsonl"), str(work / "ro" / "out.jsonl"), "--to", "text"])


def no_file(name: str) -> Callable[[Path, Result], str | None]:
    return lambda work, result: f"{name} was written" if (work / name).exists() else None


SURROGATE_FILE = jsonl(rec(1)) + b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", ' \
                                 b'"content": "a\\ud800b"}]}\n'
CONVERTS = [
    conv("conv-self-force", "convert d.jsonl d.jsonl --force (its own input)",
         ("{work}/d.jsonl", "{work}/d.jsonl", "--to", "text", "--force"), ("error",), r"(?i)input|same file"),
    conv("conv-self", "convert d.jsonl d.jsonl without --force", ("{work}/d.jsonl", "{work}/d.jsonl", "--to", "text"),
         ("error",), r"(?i)input|same file"),
    conv("conv-self-dotted", "convert d.jsonl sub/../d.jsonl --force",
         ("{work}/d.jsonl", "{work}/sub/../d.jsonl", "--to", "text", "--force"), ("error",), r"(?i)input|same file",
         lambda work: (put(("d.jsonl", GOOD_FILE))(work), (work / "sub").mkdir())),
    conv("conv-hard-link", "convert --force onto a hard link of the input",
         ("{work}/d.jsonl", "{work}/link.jsonl", "--to", "text", "--force"), ("error",), r"(?i)input|same file",
         hard_link),
    conv("conv-symlink", "convert --force onto a symlink to the input",
         ("{work}/d.jsonl", "{work}/link.jsonl", "--to", "text", "--force"), ("error",), r"(?i)input|same file",
         sym_link),
    Scenario("conv-relative-from-dataset", CONVERT,
             "from dataset/: convert dataset/d.jsonl d.jsonl --force (the same file by two relative paths)",
             convert_from_dataset_folder, ("error", "accepted"), r"(?i)input|same file",
             put(("dataset/d.jsonl", GOOD_FILE))),
    conv("conv-exists", "convert onto an existing file without --force",
         ("{work}/d.jsonl", "{work}/out.jsonl", "--to", "text"), ("error",), r"(?i)exists.*--force",
         put(("d.jsonl", GOOD_FILE), ("out.jsonl", b"keep me\n"))),
    conv("conv-force-other", "convert --force onto another existing file (asked for)",
         ("{work}/d.jsonl", "{work}/out.jsonl", "--to", "text", "--force"), ("accepted",), "",
         put(("d.jsonl", GOOD_FILE), ("out.jsonl", b"old\n")), may_change=("out.jsonl",)),
    conv("conv-surrogate-force", "convert --force an input with a lone surrogate onto an existing output",
         ("{work}/d.jsonl", "{work}/out.jsonl", "--to", "text", "--force"), ("error",),
         r"(?i)d\.jsonl:2.*(surrogate|UTF-8|encod)|surrogate",
         put(("d.jsonl", SURROGATE_FILE), ("out.jsonl", b"previous output\n"))),
    Scenario("conv-disk-full", CONVERT, "convert --force while the disk is full (the old output must survive)",
             convert_disk_full, ("error",), r"(?i)no space|disk|full|too large|could not write|cannot write",
             put(("big.jsonl", jsonl(*[rec(i) for i in range(40)])), ("out.jsonl", b"previous output\n"))),
    Scenario("conv-read-only", CONVERT, "convert into a read-only folder", convert_read_only, ("error",),
             r"(?i)read-only|permission|writ", lambda work: (put(("d.jsonl", GOOD_FILE))(work),
                                                              (work / "ro").mkdir())),
    conv("conv-target-directory", "convert onto an existing directory",
         ("{work}/d.jsonl", "{work}/outdir", "--to", "text", "--force"), ("error",), r"(?i)director",
         lambda work: (put(("d.jsonl", GOOD_FILE), ("outdir/keep.txt", b"x"))(work))),
    conv("conv-bad-to", "convert --to json", ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "json"), ("error",),
         r"(?i)--to.*(invalid choice|json)"),
    conv("conv-bad-layout", "convert --layout llama2", ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "text",
                                                        "--layout", "llama2"), ("error",), r"(?i)--layout"),
    conv("conv-missing-input", "convert a file that does not exist",
         ("{work}/nope.jsonl", "{work}/o.jsonl", "--to", "text"), ("error",), r"(?i)nope\.jsonl"),
    conv("conv-invalid-input", "convert a file with a broken line (no output may appear)",
         ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "text"), ("error",), r"(?i)d\.jsonl:2",
         put(("d.jsonl", jsonl(rec(1), "{oops"))), check=no_file("o.jsonl")),
    conv("conv-special-to-text", "convert --to text an answer holding <|eot_id|> (a fake turn in the output)",
         ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "text"), ("error",), r"(?i)d\.jsonl:1.*(eot_id|special)",
         put(("d.jsonl", jsonl(msgs(("user", "¿Qué?"), ("assistant", "Sí.<|eot_id|>Fin."))))),
         check=no_file("o.jsonl")),
    conv("conv-broken-text", "convert --to messages a text file with an unclosed turn",
         ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "messages"), ("error",), r"(?i)d\.jsonl:1",
         put(("d.jsonl", jsonl(text_rec(LLAMA_TEXT[:-10]))))),
    conv("conv-utf16-input", "convert a UTF-16 file", ("{work}/d.jsonl", "{work}/o.jsonl", "--to", "text"),
         ("error",), r"UTF-16", put(("d.jsonl", UTF16_FILE))),
    conv("conv-input-directory", "convert a directory", ("{work}/dir", "{work}/o.jsonl", "--to", "text"),
         ("error",), r"(?i)director", put(("dir/a.jsonl", GOOD_FILE))),
    conv("conv-no-to", "convert without --to", ("{work}/d.jsonl", "{work}/o.jsonl"), ("error",), r"(?i)--to"),
]


# --------------------------------------------------------------------------------------------
# Training settings (python -m utils.training and the notebook's TrainingSettings)
# --------------------------------------------------------------------------------------------

TRAIN_ARGS = ("--profile", "smoke", "--output-dir", "{work}/run", "--train-limit", "4", "--eval-limit", "2",
              "--max-steps", "4", "--warmup-steps", "1")
SETTINGS = "training settings"


def train_cli(*extra: str) -> Callable[[Path], int]:
    return cli(training_main, *TRAIN_ARGS, *extra)


def setting(name: str, value: str, expect: tuple[str, ...] = ("error",), match: str = "") -> Scenario:
    """``python -m utils.training --<name> <value>``: the message names the setting and the value."""
    flag = "--" + name.replace("_", "-")
    match = match or f"(?i)(?=.*{name.replace('_', '[_-]')})(?=.*{re.escape(value)})"
    return Scenario(f"set-{name}-{value}", SETTINGS, f"{flag} {value}", train_cli(flag, value), expect, match)


SETTING_VALUES = [
    ("lora_alpha", "0"), ("lora_alpha", "-8"), ("lora_dropout", "1.0"), ("lora_dropout", "1.5"),
    ("lora_dropout", "-0.1"), ("lora_dropout", "nan"), ("lora_r", "0"), ("lora_r", "-4"),
    ("learning_rate", "0"), ("learning_rate", "-0.0001"), ("learning_rate", "nan"), ("learning_rate", "inf"),
    ("learning_rate", "5"), ("warmup_steps", "-1"), ("warmup_steps", "4"), ("eval_limit", "-1"),
    ("train_limit", "-1"), ("max_steps", "0"), ("max_steps", "-10"), ("per_device_train_batch_size", "0"),
    ("gradient_accumulation_steps", "0"), ("per_device_eval_batch_size", "0"), ("max_seq_length", "0"),
    ("max_seq_length", "-512"), ("weight_decay", "-0.1"), ("weight_decay", "nan"), ("max_grad_norm", "-1"),
    ("max_grad_norm", "nan"), ("eval_steps", "0"), ("logging_steps", "0"), ("save_steps", "0"),
    ("save_total_limit", "-1"), ("memory_budget_gib", "-1"), ("memory_budget_gib", "nan"), ("seed", "-1"),
    ("lr_scheduler_type", "cosinus"), ("optim", "adamw_8bitt"), ("quantization", "nf5"), ("quantization", "NF4"),
    ("compute_dtype", "float16"), ("compute_dtype", "fp8"), ("fast_path", "yes"),
]
SETTING_SCENARIOS = [setting(n, v) for n, v in SETTING_VALUES] + [
    Scenario("set-max-seq-length-8", SETTINGS, "--max-seq-length 8 (shorter than any example)",
             train_cli("--max-seq-length", "8"), ("error",), r"(?i)max_seq_length"),
    Scenario("set-lora-r-abc", SETTINGS, "--lora-r abc", train_cli("--lora-r", "abc"), ("error",),
             exact("lora.r", "abc")),
    Scenario("set-learning-rate-abc", SETTINGS, "--learning-rate abc", train_cli("--learning-rate", "abc"),
             ("error",), exact("learning.rate", "abc")),
    Scenario("set-max-steps-1e3", SETTINGS, "--max-steps 1e3", train_cli("--max-steps", "1e3"), ("error",),
             exact("max.steps", "1e3")),
    Scenario("set-eval-limit-1.5", SETTINGS, "--eval-limit 1.5", train_cli("--eval-limit", "1.5"), ("error",),
             exact("eval.limit", r"1\.5")),
    Scenario("set-unknown-flag", SETTINGS, "--lora-rank 8 (misspelt --lora-r)", train_cli("--lora-rank", "8"),
             ("error",), r"(?i)lora-rank"),
]


def notebook_settings(**values: Any) -> Callable[[Path], Any]:
    """Notebook 04's route: ``train(TrainingSettings(...))`` with a parameter as papermill could inject it."""
    def act(work: Path) -> Any:
        from utils.training import TrainingSettings, train

        base = dict(profile="smoke", model_name="embedded", output_dir=str(work / "run"), train_limit=4,
                    eval_limit=2, max_steps=4, warmup_steps=1, eval_steps=2, save_steps=2, logging_steps=1)
        return train(TrainingSettings(**{**base, **values}), verbose=False)
    return act


def coerced(name: str, kind: type, value: Any) -> Callable[[Path, Result], str | None]:
    """When the run went ahead, ``name`` must have reached training as ``kind(value)``."""
    def check(work: Path, result: Result) -> str | None:
        settings = TRACE.get("settings")
        if settings is None:
            return None
        got = getattr(settings, name)
        return None if type(got) is kind and got == value else f"{name} reached training as {got!r}"
    return check


def nb(sid: str, what: str, expect: tuple[str, ...], match: str, check=None, **values: Any) -> Scenario:
    return Scenario(sid, "notebook 04 parameters", what, notebook_settings(**values), expect, match, check=check)


NOTEBOOK_SCENARIOS = [
    nb("nb-lora-dropout-string", "lora_dropout = '0.1' (a string)", ("error", "accepted"), r"lora_dropout",
       coerced("lora_dropout", float, 0.1), lora_dropout="0.1"),
    nb("nb-learning-rate-string", "learning_rate = '1e-4' (a string)", ("error", "accepted"), r"learning_rate",
       coerced("learning_rate", float, 1e-4), learning_rate="1e-4"),
    nb("nb-max-steps-float", "max_steps = 10.5", ("error",), r"max_steps", max_steps=10.5),
    nb("nb-eval-limit-none", "eval_limit = None", ("error",), r"eval_limit", eval_limit=None),
    nb("nb-resume-string", "resume = 'False' (a string, truthy)", ("error",), r"resume", resume="False"),
    nb("nb-gradient-checkpointing-string", "gradient_checkpointing = 'no'", ("error",), r"gradient_checkpointing",
       gradient_checkpointing="no"),
    nb("nb-lora-dropout-one", "lora_dropout = 1.0 (every input dropped)", ("error",), exact("lora_dropout", "1"),
       lora_dropout=1.0),
    nb("nb-lora-alpha-zero", "lora_alpha = 0 (LoRA scaling 0)", ("error",), exact("lora_alpha", "0"), lora_alpha=0),
]

# --------------------------------------------------------------------------------------------
# Training data given to the training
# --------------------------------------------------------------------------------------------

TDATA = "training data"
FILES = ("--train-file", "{work}/train.jsonl", "--validation-file", "{work}/test.jsonl")


def tdata(sid: str, what: str, setup, expect: tuple[str, ...], match: str, *extra: str) -> Scenario:
    return Scenario(sid, TDATA, what, train_cli(*FILES, *extra), expect, match, setup)


TRAINING_DATA = [
    Scenario("train-file-missing", TDATA, "--train-file that does not exist",
             train_cli("--train-file", "{work}/nope.jsonl"), ("error",), r"(?i)nope\.jsonl"),
    Scenario("train-file-directory", TDATA, "--train-file is a directory",
             train_cli("--train-file", "{work}/dir"), ("error",), r"(?i)dir.*director|director.*dir",
             put(("dir/a.jsonl", GOOD_FILE))),
    Scenario("train-equals-validation", TDATA, "--train-file and --validation-file are the same file",
             train_cli("--train-file", "{work}/train.jsonl", "--validation-file", "{work}/train.jsonl"), ("error",),
             r"(?i)same file|train_file.*validation_file|validation_file.*train_file",
             put(("train.jsonl", jsonl(*GOOD_TRAIN)))),
    Scenario("train-test-file-renamed", TDATA, "--test-file (renamed: training reads validation, never test)",
             train_cli("--train-file", "{work}/train.jsonl", "--test-file", "{work}/test.jsonl"), ("error",),
             r"(?i)validation_file", put(("train.jsonl", jsonl(*GOOD_TRAIN)), ("test.jsonl", jsonl(*GOOD_TEST)))),
    tdata("train-validation-leak", "a validation question is also in the training file", split_files(GOOD_TRAIN, [rec(2), rec(60)]),
          ("error",), r"(?i)leak|both|r2"),
    tdata("train-broken-line", "line 3 of the training file is broken",
          put(("train.jsonl", jsonl(rec(1), rec(2), "{oops", rec(4))), ("test.jsonl", jsonl(*GOOD_TEST))),
          ("error",), r"(?i)train\.jsonl:3"),
    tdata("train-special-token", "a training answer holds <|im_end|>",
          split_files([rec(1), msgs(("user", "¿Qué?"), ("assistant", "Sí.<|im_end|>Fin."))], GOOD_TEST),
          ("error",), r"(?i)train\.jsonl:2.*(im_end|special)"),
    tdata("train-no-system-prompt", "records without a system message (the model's hidden default would apply)",
          split_files(NO_SYSTEM, GOOD_TEST), ("warning", "error"), r"(?i)system (prompt|message)"),
    tdata("train-some-without-system", "two training records without the system message the others have",
          split_files(GOOD_TRAIN + NO_SYSTEM[:2], GOOD_TEST), ("warning", "error"), r"(?i)system (prompt|message)",
          "--train-limit", "0"),
    tdata("train-empty-file", "an empty training file", put(("train.jsonl", b""), ("test.jsonl", jsonl(*GOOD_TEST))),
          ("error",), r"(?i)train\.jsonl.*empty"),
    tdata("train-long-answer", "a 4,000-token answer with max_seq_length 512 (cut without its end-of-turn)",
          split_files(GOOD_TRAIN + [msgs(("user", "¿Qué dice todo?"), ("assistant", LONG_ANSWER))], GOOD_TEST),
          ("warning", "error"), r"(?i)trunc|max_seq_length|too long|longer"),
    tdata("train-long-system", "a system prompt longer than max_seq_length 128 (the example would be dropped)",
          split_files(GOOD_TRAIN + [{"id": "ls", "messages": chat("¿Qué?", "Eso.", system=LONG_ANSWER)}], GOOD_TEST),
          ("error", "warning"), r"(?i)drop|trunc|max_seq_length|prompt", "--max-seq-length", "128"),
]
REAL_TRAINER.update({"train-long-answer", "train-long-system", "set-max-seq-length-8"})


# --------------------------------------------------------------------------------------------
# Profiles (notebooks/params/*.yaml) and the runner
# --------------------------------------------------------------------------------------------


def edit_profile(change: Callable[[dict], None], name: str = "smoke") -> Callable[[Path], None]:
    """A setup that loads ``work/params/<name>.yaml``, applies ``change`` and writes it back."""
    import yaml

    def setup(work: Path) -> None:
        path = work / "params" / f"{name}.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return setup


def edit_text(old: str, new: str, name: str = "smoke") -> Callable[[Path], None]:
    """A setup that replaces ``old`` by ``new`` in the text of ``work/params/<name>.yaml``."""
    def setup(work: Path) -> None:
        path = work / "params" / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {path.name}"
        path.write_text(text.replace(old, new), encoding="utf-8")
    return setup


def block(number: str, **values: Any) -> Callable[[dict], None]:
    return lambda data: data["notebooks"].setdefault(number, {}).update(values)


def common(**values: Any) -> Callable[[dict], None]:
    return lambda data: data["common"].update(values)


def passed_to_notebook(number: str, name: str, kind: type, value: Any) -> Callable[[Path, Result], str | None]:
    """When the runner went ahead, notebook ``number`` must receive ``name`` as ``kind(value)``."""
    def check(work: Path, result: Result) -> str | None:
        params = TRACE.get("parameters", {}).get(number)
        if params is None:
            return None if result.outcome == "error" else f"notebook {number} would not run"
        got = params.get(name)
        return None if type(got) is kind and got == value else f"notebook {number} would get {name}={got!r}"
    return check


def runs_notebooks(*numbers: str) -> Callable[[Path, Result], str | None]:
    def check(work: Path, result: Result) -> str | None:
        got = TRACE.get("notebooks", [])
        return None if got == list(numbers) else f"runner would execute {got}, not {list(numbers)}"
    return check


PROFILE = "profiles"
RUN_SMOKE = ("--profile", "smoke", "--only", "04")


def prof(sid: str, what: str, setup, expect: tuple[str, ...], match: str, via: str = "runner", check=None) -> Scenario:
    act = cli(runner_main, *RUN_SMOKE) if via == "runner" else train_cli()
    return Scenario(sid, PROFILE, f"{what} ({'runner' if via == 'runner' else 'python -m utils.training'})", act,
                    expect, match, setup, check=check)


PROFILES = [
    prof("prof-common-typo", "common: max_seq_lenght: 256", edit_profile(common(max_seq_lenght=256)), ("error",),
         exact("max_seq_lenght", r"smoke\.yaml")),
    prof("prof-04-typo", "notebooks.04: lerning_rate", edit_profile(block("04", lerning_rate=1e-4)), ("error",),
         exact("lerning_rate", r"smoke\.yaml")),
    prof("prof-01-typo", "notebooks.01: tokenizr", edit_profile(block("01", tokenizr="llama-3.2")), ("error",),
         exact("tokenizr", r"smoke\.yaml")),
    prof("prof-common-typo-training", "common: lora_rr: 8", edit_profile(common(lora_rr=8)), ("error",),
         exact("lora_rr", r"smoke\.yaml"), via="training"),
    prof("prof-04-typo-training", "notebooks.04: warmup_step: 1", edit_profile(block("04", warmup_step=1)),
         ("error",), exact("warmup_step", r"smoke\.yaml"), via="training"),
    prof("prof-yaml-syntax", "a YAML syntax error", edit_text("common:\n", "common: [unclosed\n"), ("error",),
         r"smoke\.yaml"),
    prof("prof-yaml-tab", "a tab used for indentation", edit_text("  profile: smoke", "\tprofile: smoke"),
         ("error",), r"smoke\.yaml"),
    prof("prof-yaml-syntax-training", "a YAML syntax error", edit_text("common:\n", "common: [unclosed\n"),
         ("error",), r"smoke\.yaml", via="training"),
    prof("prof-lr-1e-4", "learning_rate: 1e-4 (a string in YAML 1.1)",
         edit_text("learning_rate: 2.0e-4", "learning_rate: 1e-4"), ("accepted", "warning", "error"),
         r"learning_rate", via="training", check=coerced("learning_rate", float, 1e-4)),
    prof("prof-lr-1e-4-runner", "learning_rate: 1e-4 (a string in YAML 1.1)",
         edit_text("learning_rate: 2.0e-4", "learning_rate: 1e-4"), ("accepted", "warning", "error"),
         r"learning_rate", check=passed_to_notebook("04", "learning_rate", float, 1e-4)),
    prof("prof-lora-r-string", "lora_r: '32' (quoted)", edit_profile(block("04", lora_r="32")),
         ("accepted", "warning", "error"), r"lora_r", via="training", check=coerced("lora_r", int, 32)),
    prof("prof-lora-r-float", "lora_r: 32.5", edit_profile(block("04", lora_r=32.5)), ("error",),
         exact("lora_r", r"32\.5"), via="training"),
    prof("prof-lora-r-bool", "lora_r: true", edit_profile(block("04", lora_r=True)), ("error",), r"lora_r",
         via="training"),
    prof("prof-lora-dropout-high", "lora_dropout: 1.5", edit_profile(block("04", lora_dropout=1.5)), ("error",),
         exact("lora_dropout", r"1\.5"), via="training"),
    prof("prof-lr-list", "learning_rate: [1e-4]", edit_profile(block("04", learning_rate=[1e-4])), ("error",),
         r"learning_rate", via="training"),
    prof("prof-null-value", "lora_alpha: (empty, i.e. null)", edit_profile(block("04", lora_alpha=None)),
         ("error",), r"lora_alpha", via="training"),
    prof("prof-common-list", "common: given as a list", edit_profile(lambda d: d.update(common=["a", "b"])),
         ("error",), r"(?i)common.*(mapping|dict|list|key: value)"),
    prof("prof-top-list", "the whole file is a list", lambda w: (w / "params" / "smoke.yaml").write_text("- a\n- b\n"),
         ("error",), r"smoke\.yaml"),
    prof("prof-top-typo", "a top-level 'notebook:' (singular)", edit_profile(lambda d: d.update(notebook={})),
         ("error",), r"notebook"),
    prof("prof-nb-99", "notebooks.99: a notebook that does not exist", edit_profile(block("99", x=1)), ("error",),
         r"99"),
    prof("prof-nb-unquoted", "notebooks: 04: unquoted (YAML reads the integer 4)",
         edit_text('"04":', "04:"), ("error", "accepted"), r"\b0?4\b",
         check=passed_to_notebook("04", "max_steps", int, 4)),
    prof("prof-notebooks-list", "notebooks: given as a list", edit_profile(lambda d: d.update(notebooks=["04"])),
         ("error",), r"(?i)notebooks.*(mapping|dict|list|key: value)"),
    prof("prof-block-list", "notebooks.04 given as a list", edit_profile(lambda d: d["notebooks"].update({"04": [1]})),
         ("error",), r"(?i)04.*(mapping|dict|list|key: value)"),
    Scenario("prof-unknown", PROFILE, "--profile nope (python -m utils.training)",
             cli(training_main, "--profile", "nope", "--output-dir", "{work}/run"), ("error",),
             exact("nope", "smoke")),
    Scenario("prof-name-with-extension", PROFILE, "--profile smoke.yaml (the file name, not the profile)",
             cli(runner_main, "--profile", "smoke.yaml"), ("error",), exact(r"smoke\.yaml", "demo")),
    Scenario("prof-unknown-runner", PROFILE, "--profile nope (runner)", cli(runner_main, "--profile", "nope"),
             ("error",), exact("nope", "smoke")),
]

RUNNER = "runner CLI"
RUNNERS = [
    Scenario("run-only-comma", RUNNER, "--only 01,03", cli(runner_main, "--profile", "smoke", "--only", "01,03"),
             ("accepted",), "", check=runs_notebooks("01", "03")),
    Scenario("run-only-space", RUNNER, "--only 01 03", cli(runner_main, "--profile", "smoke", "--only", "01", "03"),
             ("accepted",), "", check=runs_notebooks("01", "03")),
    Scenario("run-only-4", RUNNER, "--only 4", cli(runner_main, "--profile", "smoke", "--only", "4"),
             ("accepted",), "", check=runs_notebooks("04")),
    Scenario("run-only-repeated", RUNNER, "--only 01 --only 04 (the flag given twice)",
             cli(runner_main, "--profile", "smoke", "--only", "01", "--only", "04"), ("accepted", "error"),
             r"(?i)only", check=runs_notebooks("01", "04")),
    Scenario("run-only-99", RUNNER, "--only 99", cli(runner_main, "--profile", "smoke", "--only", "99"), ("error",),
             r"99"),
    Scenario("run-only-letters", RUNNER, "--only abc", cli(runner_main, "--profile", "smoke", "--only", "abc"),
             ("error",), r"abc"),
    Scenario("run-only-empty", RUNNER, "--only '' (runs nothing)", cli(runner_main, "--profile", "smoke", "--only", ""),
             ("error",), r"(?i)only|notebook"),
    Scenario("run-publish-only", RUNNER, "--publish --only 04",
             cli(runner_main, "--profile", "smoke", "--publish", "--only", "04"), ("error",), r"--publish"),
    Scenario("run-no-profile", RUNNER, "no --profile", cli(runner_main), ("error",), r"--profile"),
    Scenario("run-unknown-flag", RUNNER, "--profiles smoke (misspelt flag)", cli(runner_main, "--profiles", "smoke"),
             ("error",), r"--profile"),
    Scenario("run-publish-nothing", RUNNER, "--publish when the run made no figures",
             cli(runner_main, "--profile", "smoke", "--publish"), ("error",), r"(?i)figures"),
]

# --------------------------------------------------------------------------------------------
# Model names and evaluation
# --------------------------------------------------------------------------------------------

MODELS = "model names"


def model_folder(*, tokenizer: bool, weights: str | None) -> Callable[[Path], None]:
    """A folder ``work/m`` with the embedded model's config, optionally its tokenizer, and weights of a kind."""
    def setup(work: Path) -> None:
        from utils.modeling import model_folder as real_folder

        source, target = real_folder("embedded"), work / "m"
        target.mkdir()
        names = ["config.json", "generation_config.json"]
        names += ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] if tokenizer else []
        for name in names:
            if (source / name).exists():
                shutil.copyfile(source / name, target / name)
        if weights == "bin":
            (target / "pytorch_model.bin").write_bytes(b"pickled weights")
        elif weights == "safetensors":
            (target / "model.safetensors").symlink_to(source / "model.safetensors")
    return setup


MODEL_SCENARIOS = [
    Scenario("model-hub-offline", MODELS, "--model nobody/no-such-model (offline)",
             train_cli("--model", "nobody/no-such-model"), ("error",), r"no-such-model"),
    Scenario("model-not-hub-id", MODELS, "--model llama3 (neither a folder nor owner/name)",
             train_cli("--model", "llama3"), ("error",), exact("model_name", "llama3")),
    Scenario("model-missing-folder", MODELS, "--model ./models/nothing (no such folder)",
             train_cli("--model", "{work}/models/nothing"), ("error",), r"nothing"),
    Scenario("model-folder-no-config", MODELS, "--model a folder without config.json", train_cli("--model", "{work}/m"),
             ("error",), r"config\.json", put(("m/README.md", "weights go here"))),
    Scenario("model-folder-no-tokenizer", MODELS, "--model a folder with weights but no tokenizer",
             train_cli("--model", "{work}/m"), ("error",), r"(?i)tokenizer",
             model_folder(tokenizer=False, weights="safetensors")),
    Scenario("model-folder-pickle-only", MODELS, "--model a folder with only pytorch_model.bin (no safetensors)",
             train_cli("--model", "{work}/m"), ("error",), r"(?i)safetensors",
             model_folder(tokenizer=True, weights="bin")),
    Scenario("model-is-file", MODELS, "--model a file, not a folder", train_cli("--model", "{work}/m.txt"),
             ("error",), r"m\.txt", put(("m.txt", "x"))),
]
REAL_TRAINER.add("model-folder-pickle-only")

EVAL = "evaluation"


def finished_adapter(work: Path, folder: str = "run", weights: str = "adapter_model.safetensors") -> None:
    put((f"{folder}/04_adapter/{weights}", b"weights"),
        (f"{folder}/04_adapter/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 32})),
        (f"{folder}/04_config.json", json.dumps({"model_name": "embedded", "quantization": None,
                                                  "compute_dtype": "fp32", "parameters": {}})))(work)


def load_trained_act(work: Path) -> None:
    from utils.inference import load_trained

    load_trained(work / "run", device="cpu")


def evaluate_other_model(work: Path) -> None:
    from utils.evaluation import loading

    with patched(loading, "RUNS_DIR", work / "runs"):
        loading.load_for_evaluation("p", "unsloth/Llama-3.2-3B-Instruct", device="cpu")


def require_never_trained(work: Path) -> None:
    from utils.evaluation.loading import require_adapter

    require_adapter("bad-inputs-never-trained")


EVALUATION = [
    Scenario("eval-no-run", EVAL, "notebook 05 on a profile never trained", require_never_trained, ("error",),
             r"(?i)notebook 04|--only 04"),
    Scenario("eval-empty-run", EVAL, "load_trained on an empty run folder", load_trained_act, ("error",),
             r"(?i)no finished training run|04_adapter", lambda work: (work / "run").mkdir()),
    Scenario("eval-pickled-adapter", EVAL, "load_trained on a run whose adapter is pickled (.bin)", load_trained_act,
             ("error",), r"(?i)safetensors", lambda work: finished_adapter(work, weights="adapter_model.bin")),
    Scenario("eval-corrupt-config", EVAL, "load_trained on a run whose 04_config.json is cut", load_trained_act,
             ("error",), r"04_config\.json",
             lambda work: (finished_adapter(work), (work / "run" / "04_config.json").write_text('{"model_na'))),
    Scenario("eval-model-mismatch", EVAL, "notebook 05 with another model_name than the one trained",
             evaluate_other_model, ("error",), r"(?i)model_name",
             lambda work: finished_adapter(work, folder="runs/p")),
]


# --------------------------------------------------------------------------------------------
# Run lifecycle: reruns, finished runs, concurrent runs, resume
# --------------------------------------------------------------------------------------------

LIFE = "run lifecycle"
LIFE_VALUES = dict(train_limit=4, eval_limit=2, max_steps=6, warmup_steps=1, save_steps=2)
LIFE_ARGS = ("--profile", "smoke", "--output-dir", "{work}/run", "--train-limit", "4", "--eval-limit", "2",
             "--max-steps", "6", "--warmup-steps", "1", "--save-steps", "2")


def life_cli(*extra: str) -> Callable[[Path], int]:
    return cli(training_main, *LIFE_ARGS, *extra)


def life_notebook(**values: Any) -> Callable[[Path], Any]:
    """Notebook 04 with ``resume = False`` (its default), run again on the same folder."""
    return notebook_settings(**{**LIFE_VALUES, "save_steps": 2, "eval_steps": 2, **values})


def _cli_parameters(work: Path) -> dict:
    from utils.training.cli import profile_settings

    return profile_settings("smoke", output_dir=str(work / "run"), **LIFE_VALUES).to_dict()


def _notebook_parameters(work: Path) -> dict:
    from utils.training import TrainingSettings

    return TrainingSettings(profile="smoke", model_name="embedded", output_dir=str(work / "run"), eval_steps=2,
                            logging_steps=1, **LIFE_VALUES).to_dict()


def make_run(finished: bool, steps: tuple[int, ...] = (2, 4), half: tuple[int, ...] = (),
             parameters: Callable[[Path], dict] = _cli_parameters) -> Callable[[Path], None]:
    """A run folder as training leaves it: config, checkpoints (some half-written), and the outputs if finished."""
    def setup(work: Path) -> None:
        run = work / "run"
        record = {"notebook": "04", "model_name": "embedded", "quantization": None, "compute_dtype": "fp32",
                  "replicate_original": False, "parameters": parameters(work)}
        files = [("run/04_config.json", json.dumps(record, indent=2))]
        for step in steps:
            state = {"global_step": step, "max_steps": 6, "num_input_tokens_seen": 100 * step, "log_history": []}
            files += [(f"run/04_checkpoints/checkpoint-{step}/{name}", f"{name} of step {step}")
                      for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                                   "scheduler.pt", "rng_state.pth")]
            files.append((f"run/04_checkpoints/checkpoint-{step}/trainer_state.json", json.dumps(state)))
        for step in half:
            files.append((f"run/04_checkpoints/checkpoint-{step}/trainer_state.json", '{"global_st'))
        if finished:
            files += [("run/04_adapter/adapter_model.safetensors", "final weights"),
                      ("run/04_adapter/adapter_config.json", '{"r": 32}'), ("run/04_run.json", '{"training": {}}'),
                      ("run/04_log_history.csv", "step,loss\n1,3.0\n")]
        put(*files)(work)
        assert run.is_dir()
    return setup


def resumed_from(step: int) -> Callable[[Path, Result], str | None]:
    """When the run went ahead, it continued from ``checkpoint-<step>`` (from none when ``step`` < 0)."""
    def check(work: Path, result: Result) -> str | None:
        if "resume_from" not in result.reached:
            return None
        got = result.reached["resume_from"] or ""
        if step < 0:  # other settings: continuing the old checkpoints would mix two runs
            return f"continued {got} with other settings" if got else None
        return None if got.endswith(f"checkpoint-{step}") else f"trained from {got or 'step 0'}, not checkpoint-{step}"
    return check


HOLD_TIMEOUT = 180


def _start_holder(work: Path, *extra: str) -> subprocess.Popen:
    """A second process running the same training, held inside ``trainer.train()`` until released."""
    hold = work / ".hold"
    hold.mkdir(exist_ok=True)
    env = {**os.environ, "BAD_INPUTS_HOLD": str(hold), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    args = [a.format(work=work) for a in (*LIFE_ARGS, *extra)]
    proc = subprocess.Popen([sys.executable, __file__, "--hold", str(work), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not (hold / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not (hold / "started").exists():
        proc.kill()
        proc.wait()
        raise RuntimeError("the first training never reached trainer.train()")
    return proc


def concurrent_run(work: Path) -> int:
    """Two trainings into one folder at once: the second must be refused while the first runs."""
    proc = _start_holder(work, "--resume")
    try:
        return training_main([a.format(work=work) for a in (*LIFE_ARGS, "--resume")])
    finally:
        (work / ".hold" / "release").write_text("1")
        proc.wait(timeout=60)


def rerun_after_kill(work: Path) -> int:
    """A run killed with SIGKILL (its lock left behind), then resumed: the stale lock must not block it."""
    proc = _start_holder(work, "--resume")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return training_main([a.format(work=work) for a in (*LIFE_ARGS, "--resume")])


CONFIG = "run/04_config.json"
FINISHED = r"(?i)finished|already|exists|overwrit|new folder|output_dir|previous|moved"
LIFECYCLE = [
    Scenario("life-rerun-after-crash", LIFE, "the same command again after a crash, without --resume",
             life_cli(), ("error", "warning"), r"(?i)resum|checkpoint", make_run(False), (CONFIG,),
             resumed_from(4)),
    Scenario("life-rerun-after-crash-notebook", LIFE, "notebook 04 'Run all' after a crash (its default resume)",
             life_notebook(), ("error", "warning"), r"(?i)resum|checkpoint",
             make_run(False, parameters=_notebook_parameters), (CONFIG,), resumed_from(4)),
    Scenario("life-rerun-after-crash-notebook-false", LIFE, "notebook 04 after a crash with resume = False",
             life_notebook(resume=False), ("error", "warning"), r"(?i)resum|checkpoint",
             make_run(False, parameters=_notebook_parameters)),
    Scenario("life-second-run-finished", LIFE, "a second training into a finished run's folder",
             life_cli(), ("error", "warning"), FINISHED,
             make_run(True, steps=(2, 4, 6))),
    Scenario("life-second-run-finished-notebook", LIFE, "notebook 04 run again on a finished run (its default resume)",
             life_notebook(), ("error", "warning"), FINISHED,
             make_run(True, steps=(2, 4, 6), parameters=_notebook_parameters)),
    Scenario("life-second-run-other-settings", LIFE, "a finished run's folder reused with --lora-r 8",
             life_cli("--lora-r", "8"), ("error", "warning"),
             FINISHED, make_run(True, steps=(2, 4, 6))),
    Scenario("life-rerun-no-resume", LIFE, "the same command after a crash with --no-resume (checkpoints left)",
             life_cli("--no-resume"), ("error", "warning"), r"(?i)resum|checkpoint", make_run(False)),
    Scenario("life-rerun-other-settings", LIFE, "after a crash, the command again with --lora-r 8 (no --resume)",
             life_cli("--lora-r", "8"), ("error", "warning"), r"(?i)resum|checkpoint|lora_r", make_run(False),
             check=resumed_from(-1)),
    Scenario("life-resume-bad-value", LIFE, "--resume maybe", life_cli("--resume", "maybe"), ("error",),
             exact("resume", "maybe"), make_run(False)),
    Scenario("life-resume-changed-lora-r", LIFE, "--resume with --lora-r 8 (checkpoint has 32)",
             life_cli("--resume", "--lora-r", "8"), ("error",), exact("lora_r", "8"), make_run(False)),
    Scenario("life-resume-changed-lr", LIFE, "--resume with another --learning-rate",
             life_cli("--resume", "--learning-rate", "0.001"), ("error",), r"learning_rate", make_run(False)),
    Scenario("life-resume-changed-train-file", LIFE, "--resume with another --train-file",
             life_cli("--resume", "--train-file", "{work}/other.jsonl"), ("error",), r"train_file",
             lambda work: (make_run(False)(work), put(("other.jsonl", jsonl(*GOOD_TRAIN)))(work))),
    Scenario("life-resume-extend-finished", LIFE, "--resume --max-steps 8 on a run finished at 6",
             life_cli("--resume", "--max-steps", "8"), ("error", "warning"), r"max_steps",
             make_run(True, steps=(2, 4, 6))),
    Scenario("life-resume-no-checkpoint", LIFE, "--resume on a folder without checkpoints",
             life_cli("--resume"), ("warning", "error"), r"(?i)no (complete )?checkpoint|step 0|nothing to resume|no tiene checkpoints|paso 0",
             make_run(False, steps=()), (CONFIG,)),
    Scenario("life-resume-half-written", LIFE, "--resume when the only checkpoint was cut while being written",
             life_cli("--resume"), ("warning", "error"), r"(?i)checkpoint", make_run(False, steps=(), half=(2,)),
             (CONFIG,)),
    Scenario("life-resume-ok", LIFE, "--resume after a crash with the same settings (continues at checkpoint-4)",
             life_cli("--resume"), ("accepted", "warning"), r"(?i)checkpoint-4|resum", make_run(False, half=(6,)),
             (CONFIG,), resumed_from(4)),
    Scenario("life-output-dir-file", LIFE, "--output-dir names an existing file",
             cli(training_main, *TRAIN_ARGS, "--output-dir", "{work}/file.txt"), ("error",),
             r"(?i)file\.txt", put(("file.txt", "notes"))),
    Scenario("life-output-dir-read-only", LIFE, "--output-dir on a read-only folder",
             lambda work: _read_only_training(work), ("error",), r"(?i)read-only|permission|writ",
             lambda work: (work / "ro").mkdir()),
    Scenario("life-disk-full", LIFE, "training resumes after a crash while the disk is full (04_config.json "
             "cannot be written)", lambda work: _disk_full_training(work), ("error",),
             r"(?i)no space|disk|full|too large|cannot write|could not write", make_run(False)),
    Scenario("life-concurrent", LIFE, "two trainings into the same folder at once", concurrent_run, ("error",),
             r"(?i)lock|another|already running|in use|busy|running", make_run(False), (CONFIG,), slow=True),
    Scenario("life-stale-lock", LIFE, "--resume after a kill -9 (the dead run's lock is left behind)",
             rerun_after_kill, ("accepted", "warning"), r"(?i)lock|resum|checkpoint", make_run(False), (CONFIG,),
             resumed_from(4), slow=True),
]


def _disk_full_training(work: Path) -> int:
    with disk_full():
        return training_main([a.format(work=work) for a in LIFE_ARGS])


def _read_only_training(work: Path) -> int:
    with read_only(work / "ro"):
        return training_main([a.format(work=work) for a in (*TRAIN_ARGS, "--output-dir", "{work}/ro/run")])


SCENARIOS: list[Scenario] = (
    [bad_line(f"line-{sid}", what, line, match) for sid, what, line, match in LINE_DAMAGE]
    + [text_line(sid, what, obj, match) for sid, what, obj, match in TEXT_DAMAGE]
    + FILE_DAMAGE + LOAD_RECORDS + BUILDS + NOTEBOOK01 + CONVERTS + SETTING_SCENARIOS + NOTEBOOK_SCENARIOS
    + TRAINING_DATA
    + PROFILES + RUNNERS + MODEL_SCENARIOS + EVALUATION + LIFECYCLE
)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_the_probe_is_big_enough_and_ids_are_unique():
    assert len(SCENARIOS) >= 120
    ids = [sc.id for sc in SCENARIOS]
    assert len(ids) == len(set(ids))
    for sc in SCENARIOS:
        assert set(sc.expect) <= {"error", "warning", "accepted"}, sc.id


@pytest.mark.parametrize(
    "sc", [pytest.param(sc, id=sc.id, marks=[pytest.mark.slow] if sc.slow else []) for sc in SCENARIOS]
)
def test_bad_input_gets_one_clear_message(sc: Scenario, tmp_path):
    result = perform(sc, tmp_path / "work")
    assert result.ok, (f"{sc.id} ({sc.what}): {result.outcome}: {result.problem}\n  message: {result.message}\n"
                       f"  stderr: {result.stderr[-1500:]}\n  stdout: {result.stdout[-800:]}")


if __name__ == "__main__" and sys.argv[1:2] == ["--hold"]:  # the first of two concurrent trainings
    with sandbox(Path(sys.argv[2])):
        try:
            training_main(sys.argv[3:])
        except Reached:
            pass
