"""Issue #19, the dataset's side: nothing the user wrote is overwritten, and every bad input gets one message.

The converter never writes over its input (hard links, symlinks, relative paths from another folder) and a
failed write leaves the previous file; odd files (UTF-16, folders, deep or huge JSON, lone surrogates,
template special tokens) get one ``file:line`` message; training refuses leaked splits and silently dropped
examples, and says what it truncated and which records got the dataset's system prompt.
"""

from __future__ import annotations

import errno
import json
import os
import types
from pathlib import Path

import nbformat
import pytest

from utils import data, paths
from utils.inference import prompt_of, with_system_prompt
from utils.paths import NOTEBOOKS_DIR
from utils.training import data as training_data
from utils.training.data import load_training_data
from utils.training.settings import TrainingConfigError, TrainingSettings

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SYSTEM_PROMPT = "Sos un asistente sobre la normativa de la UTN. Respondé en español y citá la norma."


def chat(question: str, answer: str, system: str | None = SYSTEM_PROMPT, **fields) -> dict:
    """A messages-format record (no system turn when ``system`` is None)."""
    turns = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {**fields, "messages": turns}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def only_problem(report: data.ValidationReport) -> data.Problem:
    assert len(report.problems) == 1, report.format()
    return report.problems[0]


# --------------------------------------------------------------------------------------------
# convert --force never writes over its input, and a failed write keeps the previous file
# --------------------------------------------------------------------------------------------


def test_convert_refuses_a_hard_linked_output(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes((FIXTURES / "clean_messages.jsonl").read_bytes())
    before = source.read_bytes()
    linked = tmp_path / "linked.jsonl"
    os.link(source, linked)
    with pytest.raises(data.DatasetError, match="never writes over its input"):
        data.convert_file(source, linked, to="text", force=True)
    assert source.read_bytes() == before


def test_convert_refuses_a_symlinked_output(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes((FIXTURES / "clean_messages.jsonl").read_bytes())
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    with pytest.raises(data.DatasetError, match="never writes over its input"):
        data.convert_file(source, tmp_path / "link.jsonl", to="text", force=True)
    assert source.read_bytes() == before


def test_convert_run_from_the_dataset_folder_refuses_its_own_input(tmp_path, monkeypatch, capsys):
    # The input is read relative to the repository root, the output relative to the current folder: from
    # dataset/, "dataset/in.jsonl" and "in.jsonl" are the same file.
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    folder = tmp_path / "dataset"
    folder.mkdir()
    source = folder / "in.jsonl"
    source.write_bytes((FIXTURES / "clean_messages.jsonl").read_bytes())
    before = source.read_bytes()
    monkeypatch.chdir(folder)
    code = data.main(["convert", "dataset/in.jsonl", "in.jsonl", "--to", "text", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "never writes over its input" in err
    assert source.read_bytes() == before


def test_lone_surrogate_input_is_one_error_and_the_forced_target_survives(tmp_path):
    source = tmp_path / "in.jsonl"
    good = json.dumps(chat("¿Hola?", "Sí."))
    bad = json.dumps(chat("¿Qué?", "Roto \ud800"))  # ASCII JSON: the answer holds the escape \ud800
    assert "\\ud800" in bad
    source.write_text(good + "\n" + bad + "\n", encoding="utf-8")
    problem = only_problem(data.validate_file(source))
    assert problem.line == 2 and "lone surrogate" in problem.message
    target = tmp_path / "out.jsonl"
    target.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(data.DatasetError, match=":2: error: .*lone surrogate"):
        data.convert_file(source, target, to="text", force=True)
    assert target.read_text(encoding="utf-8") == "keep me\n"


def _disk_full(monkeypatch):
    """Every write through ``os.fdopen`` (the atomic writer's temporary file) fails with ENOSPC."""
    real = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real(fd, *a, **k)))


def test_disk_full_while_converting_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes((FIXTURES / "clean_messages.jsonl").read_bytes())
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"previous bytes\n")
    _disk_full(monkeypatch)
    code = data.main(["convert", str(source), str(target), "--to", "text", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "No space left" in err and "intact" in err
    assert target.read_bytes() == b"previous bytes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_disk_full_while_writing_a_split_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "train.jsonl"
    target.write_bytes(b"old split\n")
    _disk_full(monkeypatch)
    with pytest.raises(OSError):
        data.write_jsonl(data.load_records(FIXTURES / "clean_messages.jsonl"), target)
    assert target.read_bytes() == b"old split\n" and [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


# --------------------------------------------------------------------------------------------
# One message per odd file: UTF-16, a folder, deep or huge JSON, a missing file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le"])
def test_utf16_input_is_reported_as_utf16(tmp_path, encoding):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((FIXTURES / "clean_messages.jsonl").read_text(encoding="utf-8").encode(encoding))
    problem = only_problem(data.validate_file(path))
    assert "UTF-16" in problem.message and "save as UTF-8" in problem.message
    assert "Latin-1" not in problem.message


def test_a_folder_given_as_a_file_is_one_message(tmp_path):
    problem = only_problem(data.validate_file(tmp_path))
    assert "is a directory" in problem.message and str(tmp_path) in problem.message
    with pytest.raises(data.DatasetError, match="is a directory"):
        data.convert_file(FIXTURES / "clean_messages.jsonl", tmp_path, to="text")


def test_deeply_nested_json_is_one_message_with_its_line(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    good = json.dumps(chat("¿Hola?", "Sí."))
    path.write_text(good + "\n" + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    problem = only_problem(data.validate_file(path))
    assert problem.line == 2 and "nested too deeply" in problem.message
    assert data.main(["validate", "--no-tokenizer", str(path)]) == 1
    assert f"{path}:2: error: JSON nested too deeply" in capsys.readouterr().out


def test_huge_number_json_is_one_message_with_its_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    good = json.dumps(chat("¿Hola?", "Sí."))
    path.write_text(good + "\n" + '{"id": ' + "9" * 5000 + ', "messages": []}\n', encoding="utf-8")
    problem = only_problem(data.validate_file(path))
    assert problem.line == 2 and "number" in problem.message and " — " in problem.message


def test_a_missing_file_names_its_path(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert str(missing) in only_problem(data.validate_file(missing)).message
    assert data.main(["convert", str(missing), str(tmp_path / "out.jsonl"), "--to", "text"]) == 2
    assert str(missing) in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# validate checks lengths by default
# --------------------------------------------------------------------------------------------


def test_validate_checks_lengths_with_the_thesis_tokenizer_by_default(capsys):
    assert data.main(["validate", str(FIXTURES / "too_long.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "too_long.jsonl:2: warning:" in out and "longer than max_seq_length=512" in out


def test_validate_without_tokenizer_says_lengths_were_not_checked(capsys):
    assert data.main(["validate", "--no-tokenizer", str(FIXTURES / "too_long.jsonl")]) == 0
    out = capsys.readouterr().out
    assert ": warning:" not in out and "lengths were not checked" in out


def test_validate_says_a_prompt_that_fills_max_seq_length_would_be_dropped(tmp_path, embedded_tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [chat("¿Hola?", "Sí."), chat("¿Quién?", "El Consejo.",
                                                                            system="Contexto largo. " * 40)])
    report = data.validate_file(path, tokenizer=embedded_tokenizer, max_seq_length=64)
    [problem] = report.errors
    assert problem.line == 2 and "drop this example" in problem.message


def test_validate_the_same_file_twice_is_a_leak(tmp_path, capsys):
    path = FIXTURES / "clean_messages.jsonl"
    assert data.main(["validate", "--no-tokenizer", str(path), str(path)]) == 1
    assert "is the same file as" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Chat-template special tokens in content
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|endoftext|>",
                                   "<|finetune_right_pad_id|>"])
def test_special_tokens_in_content_are_an_error_with_line_and_token(tmp_path, token):
    path = write_lines(tmp_path / "inj.jsonl", [chat("¿Hola?", "Sí."), chat("¿Y?", f"Listo.{token}user\nOtra")])
    problem = only_problem(data.validate_file(path))
    assert problem.severity == "error" and problem.line == 2 and token in problem.message


def test_convert_to_text_refuses_special_tokens(tmp_path):
    path = write_lines(tmp_path / "inj.jsonl", [chat("¿Hola?", "Sí.<|im_end|>")])
    with pytest.raises(data.DatasetError, match="<\\|im_end\\|>"):
        data.convert_file(path, tmp_path / "out.jsonl", to="text")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_loaded_tokenizers_special_tokens_are_refused_too(tmp_path, embedded_tokenizer):
    path = write_lines(tmp_path / "custom.jsonl", [chat("¿Hola?", "Sí.<custom_stop>")])
    assert data.validate_file(path).ok
    stub = types.SimpleNamespace(all_special_tokens=["<custom_stop>"], name_or_path="stub", bos_token=None,
                                 apply_chat_template=embedded_tokenizer.apply_chat_template)
    problem = only_problem(data.validate_file(path, tokenizer=stub))
    assert "<custom_stop>" in problem.message and problem.line == 1


# --------------------------------------------------------------------------------------------
# Notebook 01: a leak stops the run unless acknowledged
# --------------------------------------------------------------------------------------------


def _leak_reports():
    train, test = FIXTURES / "overlap_train.jsonl", FIXTURES / "overlap_test.jsonl"
    return [data.validate_file(train, other_paths=[test]), data.validate_file(test, other_paths=[train])]


def test_check_reports_refuses_a_leak_naming_the_ids_unless_allowed():
    with pytest.raises(data.DatasetError, match="leaked ids: overlap_test-2"):
        data.check_reports(_leak_reports())
    notes = data.check_reports(_leak_reports(), allow_split_overlap=True)
    assert any("overlap_test-2" in n for n in notes)
    assert data.check_reports([data.validate_file(FIXTURES / "clean_messages.jsonl")]) == []


def test_check_reports_still_refuses_other_errors_when_a_leak_is_allowed():
    with pytest.raises(data.DatasetError, match="invalid JSON"):
        data.check_reports([data.validate_file(FIXTURES / "invalid_json.jsonl")], allow_split_overlap=True)


def test_train_and_test_as_one_file_is_a_leak(tmp_path):
    (tmp_path / "same.jsonl").symlink_to(FIXTURES / "clean_messages.jsonl")
    report = data.validate_file(FIXTURES / "clean_messages.jsonl", other_paths=[tmp_path / "same.jsonl"])
    assert [p.code for p in report.errors] == [data.SPLIT_OVERLAP] and "same file" in report.errors[0].message


def test_notebook_01_raises_on_a_leak_unless_its_parameter_allows_it():
    notebook = nbformat.read(NOTEBOOKS_DIR / "01_dataset_inspection.ipynb", as_version=4)
    cells = {c["id"]: c for c in notebook.cells}
    assert "allow_split_overlap = False  #" in cells["cell-01"].source
    assert "data.check_reports(reports, allow_split_overlap=allow_split_overlap)" in cells["cell-06"].source


# --------------------------------------------------------------------------------------------
# The system-prompt policy (training and evaluation prompts)
# --------------------------------------------------------------------------------------------


def test_apply_system_prompt_adds_the_dataset_prompt_and_says_so():
    records = [chat("¿A?", "a", id="1"), chat("¿B?", "b", id="2"), chat("¿C?", "c", system=None, id="3")]
    policy = data.system_prompt_policy(records)
    assert policy == SYSTEM_PROMPT
    out, notes = data.apply_system_prompt(records, policy)
    assert out[2]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert records[2]["messages"][0]["role"] == "user"  # the input is not changed
    assert notes and notes[0].startswith("1 records had no system message; the dataset's system prompt was added")
    assert data.apply_system_prompt(records[:2], policy) == (records[:2], [])


def test_evaluation_prompts_get_the_dataset_system_prompt():
    records = [chat("¿A?", "a", id="1"), chat("¿C?", "c", system=None, id="3")]
    assert prompt_of(records[1]) == [{"role": "user", "content": "¿C?"}]  # unchanged without a policy
    assert prompt_of(records[1], SYSTEM_PROMPT)[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert with_system_prompt([prompt_of(r) for r in records]) == ([prompt_of(r) for r in records], [])
    chats, notes = with_system_prompt([prompt_of(r) for r in records], data.system_prompt_policy(records))
    assert all(c[0]["role"] == "system" for c in chats) and len(notes) == 1


# --------------------------------------------------------------------------------------------
# Training data: leaks, special tokens, long examples and the system prompt, refused or reported
# --------------------------------------------------------------------------------------------

FIXED_LOSS = types.SimpleNamespace(loss="completion_only")  # the part of TrainingPlan the data loading reads
LONG_ANSWER = "La Ord. 1549 tiene diez capítulos. " * 10  # 228 tokens under the embedded (SmolLM2) template
LONG_SYSTEM = "Contexto largo de la normativa. " * 20  # a prompt of 223 tokens


def training_settings(tmp_path: Path, train: list[dict], validation: list[dict] | None = None, **extra):
    """Settings reading ``train`` / ``validation`` from files in ``tmp_path``; ``extra`` set as attributes."""
    validation = validation if validation is not None else [chat("¿Pregunta de validación distinta?", "Respuesta.",
                                                                 id="v1")]
    settings = TrainingSettings(profile="smoke", model_name="embedded", output_dir=str(tmp_path / "run"),
                                train_file=str(write_lines(tmp_path / "train.jsonl", train)),
                                validation_file=str(write_lines(tmp_path / "validation.jsonl", validation)))
    for key, value in extra.items():
        setattr(settings, key, value)  # allow_* are TrainingSettings fields; set like this to read as getattr
    return settings


def long_records() -> list[dict]:
    return [chat("¿Qué ordenanza rige?", "La Ord. 1549.", id="ok"),
            chat("¿Cuántos capítulos?", LONG_ANSWER, id="long"),
            chat("¿Quién aprueba?", "El Consejo.", system=LONG_SYSTEM, id="drop")]


def test_training_refuses_to_drop_long_examples_naming_ids_and_fix(tmp_path, embedded_tokenizer):
    settings = training_settings(tmp_path, long_records(), max_seq_length=100)
    with pytest.raises(TrainingConfigError) as info:
        load_training_data(settings, FIXED_LOSS, embedded_tokenizer)
    message = str(info.value)
    for fragment in ("drop", "max_seq_length=100", "raise max_seq_length", "shorten the system prompt",
                     "allow_dropping_long_examples"):
        assert fragment in message, message
    assert "long" not in message.split("ids:")[1].split(")")[0]  # only the dropped one is named here


def test_training_reports_truncated_and_dropped_examples_when_allowed(tmp_path, embedded_tokenizer):
    settings = training_settings(tmp_path, long_records(), max_seq_length=100, allow_dropping_long_examples=True)
    loaded = load_training_data(settings, FIXED_LOSS, embedded_tokenizer)
    assert loaded.truncated_ids == ["long"] and loaded.dropped_ids == ["drop"]
    assert [r["id"] for r in loaded.train_records] == ["ok", "long"] and len(loaded.train) == 2
    assert any("answer is cut" in n and "long" in n for n in loaded.notes)
    assert any("dropped" in n and "drop" in n for n in loaded.notes)


def test_an_empty_training_set_after_dropping_names_the_setting(tmp_path, embedded_tokenizer):
    records = [chat("¿Quién aprueba?", "El Consejo.", system=LONG_SYSTEM, id="drop")]
    settings = training_settings(tmp_path, records, max_seq_length=100, allow_dropping_long_examples=True)
    with pytest.raises(TrainingConfigError, match="no training example is left: allow_dropping_long_examples"):
        load_training_data(settings, FIXED_LOSS, embedded_tokenizer)


def test_training_refuses_a_train_validation_leak_naming_the_ids(tmp_path, embedded_tokenizer):
    train = [chat("¿Qué ordenanza rige?", "La Ord. 1549.", id="a"), chat("¿Otra?", "Sí.", id="b")]
    validation = [chat("¿que ORDENANZA rige", "La 1549.", id="v-leak"), chat("¿Nueva?", "No.", id="v-ok")]
    settings = training_settings(tmp_path, train, validation)
    with pytest.raises(data.DatasetError, match="leaked ids: v-leak \\(1\\)") as info:
        load_training_data(settings, FIXED_LOSS, embedded_tokenizer)
    assert "allow_split_overlap" in str(info.value)
    settings = training_settings(tmp_path, train, validation, allow_split_overlap=True)
    loaded = load_training_data(settings, FIXED_LOSS, embedded_tokenizer)
    assert any("v-leak" in n and "allow_split_overlap=True" in n for n in loaded.notes)


def test_training_evaluates_on_validation_and_opens_test_only_to_refuse_an_overlap(tmp_path, embedded_tokenizer,
                                                                                    monkeypatch):
    read = []
    monkeypatch.setattr(training_data, "load_records", lambda p: read.append(str(p)) or data.load_records(p))
    settings = training_settings(tmp_path, [chat("¿Hola?", "Sí.", id="a")])
    loaded = load_training_data(settings, FIXED_LOSS, embedded_tokenizer)
    assert [r["id"] for r in loaded.validation_records] == ["v1"]
    assert read[:2] == [settings.train_file, settings.validation_file] and set(read[2:]) <= {str(paths.TEST_FILE)}


def test_training_refuses_one_file_as_train_and_validation(tmp_path, embedded_tokenizer):
    settings = training_settings(tmp_path, [chat("¿Hola?", "Sí.", id="a")])
    (tmp_path / "alias.jsonl").symlink_to(tmp_path / "train.jsonl")
    settings.validation_file = str(tmp_path / "alias.jsonl")
    with pytest.raises(data.DatasetError, match="train_file and validation_file are the same file"):
        load_training_data(settings, FIXED_LOSS, embedded_tokenizer)


def test_training_refuses_special_tokens_in_content(tmp_path, embedded_tokenizer):
    settings = training_settings(tmp_path, [chat("¿Hola?", "Sí.<|im_end|>", id="a")])
    with pytest.raises(data.DatasetError, match="<\\|im_end\\|>"):
        load_training_data(settings, FIXED_LOSS, embedded_tokenizer)


def test_training_adds_the_dataset_system_prompt_and_says_so(tmp_path, embedded_tokenizer):
    train = [chat("¿A?", "a", id="a"), chat("¿B?", "b", id="b"), chat("¿C?", "c", system=None, id="c")]
    loaded = load_training_data(training_settings(tmp_path, train), FIXED_LOSS, embedded_tokenizer)
    by_id = {r["id"]: r for r in loaded.train_records}
    assert by_id["c"]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert any("1 records had no system message; the dataset's system prompt was added" in n for n in loaded.notes)
    row = next(r for r in loaded.train if r["id"] == "c")
    assert row["prompt"][0]["content"] == SYSTEM_PROMPT  # not the template's hidden "named SmolLM" default
