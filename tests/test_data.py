"""utils.data: the validator on one damaged fixture per kind, the converter, the three-way split, the shipped corpus."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections import Counter
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from utils import data
from utils.plotting import check_print_standard
from utils.plotting import data as data_plots
from utils.paths import REPO_ROOT, TEST_FILE, TRAIN_FILE, VALIDATION_FILE

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SMALL_CORPUS = FIXTURES / "corpus_small.yaml"


def problems_of(name: str, **kwargs) -> list[tuple[str, int, str]]:
    report = data.validate_file(FIXTURES / name, **kwargs)
    return [(p.severity, p.line, p.message) for p in report.problems]


def assert_reported(name: str, severity: str, line: int, fragment: str, **kwargs) -> None:
    found = problems_of(name, **kwargs)
    assert any(s == severity and n == line and fragment in m for s, n, m in found), found


# --------------------------------------------------------------------------------------------
# The validator: one fixture per kind of damage, each reported with its line
# --------------------------------------------------------------------------------------------

DAMAGE = [
    ("invalid_json.jsonl", "error", 2, "invalid JSON"),
    ("empty_line.jsonl", "warning", 2, "empty line"),
    ("bom.jsonl", "warning", 1, "byte-order mark"),
    ("crlf.jsonl", "warning", 1, "CRLF"),
    ("bad_encoding.jsonl", "error", 2, "not valid UTF-8"),
    ("missing_field.jsonl", "error", 2, "missing field 'messages'"),
    ("empty_field.jsonl", "error", 2, "empty 'content'"),
    ("unknown_role.jsonl", "error", 2, "unknown role 'human'"),
    ("roles_order.jsonl", "error", 2, "roles out of order"),
    ("no_assistant.jsonl", "error", 2, "no assistant turn"),
    ("mixed_formats.jsonl", "error", 3, "uses the 'text' format while line 1 uses 'messages'"),
    ("broken_header.jsonl", "error", 2, "did you mean <|end_header_id|>"),
    ("broken_header.jsonl", "error", 2, "not closed by <|end_header_id|>"),
    ("duplicates.jsonl", "error", 3, "exact duplicate of line 1"),
    ("duplicates.jsonl", "error", 4, "same question as line 2"),
    ("empty.jsonl", "error", 1, "the file is empty"),
]


@pytest.mark.parametrize("name,severity,line,fragment", DAMAGE, ids=[f"{d[0]}:{d[2]}" for d in DAMAGE])
def test_each_damage_is_reported_with_its_line(name, severity, line, fragment):
    assert_reported(name, severity, line, fragment)


def test_every_message_says_how_to_fix():
    for name in {d[0] for d in DAMAGE} | {"ten_damages.jsonl"}:
        for _, _, message in problems_of(name):
            assert " — " in message, message


def test_clean_fixture_files_pass():
    for name in ("clean_messages.jsonl", "original_text.jsonl", "original_newlines.jsonl", "original_no_bos.jsonl"):
        report = data.validate_file(FIXTURES / name)
        assert report.ok and not report.warnings, report.format()
        assert len(report.records) == 5


def test_same_question_in_train_and_test_is_an_error():
    report = data.validate_file(FIXTURES / "overlap_test.jsonl", other_paths=[FIXTURES / "overlap_train.jsonl"])
    [problem] = report.errors
    assert problem.line == 2 and "overlap_train.jsonl:3" in problem.message
    assert data.validate_file(FIXTURES / "overlap_test.jsonl").ok  # alone, the file is fine


def test_example_longer_than_max_length_is_a_warning_with_the_count(llama_tokenizer):
    report = data.validate_file(FIXTURES / "too_long.jsonl", tokenizer=llama_tokenizer, max_seq_length=512)
    assert report.ok  # truncation is a warning, not an error
    tokens = report.token_counts["too_long-2"]
    assert tokens > 512
    line_warnings = [w for w in report.warnings if w.line == 2]
    assert len(line_warnings) == 1 and f"{tokens} tokens" in line_warnings[0].message
    assert any(w.line == 0 and "1 of 2 examples exceed" in w.message for w in report.warnings)


def test_every_special_token_of_the_tokenizer_is_refused_in_content(llama_tokenizer, tmp_path):
    """transformers 5's ``all_special_tokens`` names only BOS, EOS and PAD; ``<|image|>`` (id 128256, one past the text
    model's embeddings) and ``<|python_tag|>`` are added tokens flagged special, each read as one id, not as text."""
    assert llama_tokenizer("<|image|>", add_special_tokens=False)["input_ids"] == [128256]
    path = tmp_path / "d.jsonl"
    lines = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Eso."}]}
             for question in ("¿Qué es <|image|>?", "¿Dónde va <|python_tag|>?", "¿Cuándo se usa <image>?")]
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    report = data.validate_file(path, tokenizer=llama_tokenizer)
    assert [(e.line, "special token" in e.message) for e in report.errors] == [(1, True), (2, True)]
    assert "<|image|>" in report.errors[0].message and "<|python_tag|>" in report.errors[1].message
    assert data.validate_file(path).ok  # without a tokenizer, only the chat markers of SPECIAL_TOKENS are known


def test_text_with_bos_warns_about_the_double_bos(llama_tokenizer):
    report = data.validate_file(FIXTURES / "original_text.jsonl", tokenizer=llama_tokenizer)
    assert any("two BOS" in w.message for w in report.warnings)
    assert not data.validate_file(FIXTURES / "original_no_bos.jsonl", tokenizer=llama_tokenizer).warnings


def test_ten_kinds_of_damage_are_all_listed_and_the_cli_fails():
    out = subprocess.run(
        [sys.executable, "-m", "utils.data", "validate", str(FIXTURES / "ten_damages.jsonl")],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 1
    expected = [
        (1, "byte-order mark"), (3, "invalid JSON"), (4, "empty line"), (5, "unknown role 'bot'"),
        (6, "roles out of order"), (7, "no assistant turn"), (8, "missing field"), (9, "empty 'content'"),
        (10, "exact duplicate of line 2"), (11, "uses the 'text' format"), (12, "not valid UTF-8"), (13, "CRLF"),
    ]
    lines = out.stdout.splitlines()
    for line, fragment in expected:
        assert any(l.startswith(f"{FIXTURES / 'ten_damages.jsonl'}:{line}: ") and fragment in l for l in lines), (
            line, fragment, out.stdout)
    assert len({l.split(":")[1] for l in lines if l.count(":") > 2}) >= 10


def test_load_records_raises_with_the_whole_report():
    with pytest.raises(data.DatasetError) as info:
        data.load_records(FIXTURES / "ten_damages.jsonl")
    message = str(info.value)
    assert ":3: error: invalid JSON" in message and ":12: error: not valid UTF-8" in message


def test_load_records_returns_canonical_records_for_the_text_format():
    records = data.load_records(FIXTURES / "original_newlines.jsonl")
    first = records[0]
    assert list(first) == list(data.RECORD_KEYS)
    assert first["id"] == "original_newlines-1" and first["kind"] == data.DEFAULT_KIND
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][1]["content"] == "¿Qué ordenanza rige las carreras de grado desde 2017?"


# --------------------------------------------------------------------------------------------
# The original text format and the converter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["original_text.jsonl", "original_newlines.jsonl", "original_no_bos.jsonl"])
def test_text_round_trip_of_each_line_is_identical(name):
    for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        messages = data.text_to_messages(text)
        assert data.messages_to_text(messages, layout=data.detect_layout(text)) == text


LAYOUT_OPTIONS = [
    ("original_text.jsonl", []),
    ("original_newlines.jsonl", ["--layout", "newlines"]),
    ("original_no_bos.jsonl", ["--no-bos"]),
]


@pytest.mark.parametrize("name,layout", LAYOUT_OPTIONS)
def test_convert_text_to_messages_to_text_is_byte_identical(tmp_path, name, layout):
    source = FIXTURES / name
    as_messages, back = tmp_path / "messages.jsonl", tmp_path / "text.jsonl"
    assert data.main(["convert", str(source), str(as_messages), "--to", "messages"]) == 0
    assert data.validate_file(as_messages).ok
    assert data.main(["convert", str(as_messages), str(back), "--to", "text", *layout]) == 0
    assert back.read_bytes() == source.read_bytes()


def test_canonical_text_layout_is_what_the_llama_chat_template_renders(llama_tokenizer):
    messages = data.load_records(FIXTURES / "clean_messages.jsonl")[0]["messages"]
    assert data.messages_to_text(messages) == llama_tokenizer.apply_chat_template(messages, tokenize=False)


def test_convert_refuses_to_overwrite(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes((FIXTURES / "original_text.jsonl").read_bytes())
    with pytest.raises(data.DatasetError, match="never writes over its input"):
        data.convert_file(source, source, to="messages", force=True)
    target = tmp_path / "out.jsonl"
    target.write_text("keep me")
    with pytest.raises(data.DatasetError, match="--force"):
        data.convert_file(source, target, to="messages")
    assert target.read_text() == "keep me"
    data.convert_file(source, target, to="messages", force=True)
    assert len(data.load_records(target)) == 5


def test_convert_cleans_bom_and_crlf(tmp_path):
    for name in ("bom.jsonl", "crlf.jsonl"):
        out = tmp_path / name
        data.convert_file(FIXTURES / name, out, to="messages")
        report = data.validate_file(out)
        assert report.ok and not report.warnings, report.format()


def test_broken_text_raises_one_clear_error():
    with pytest.raises(data.DatasetError, match="not closed by <\\|eot_id\\|>"):
        data.text_to_messages("<|start_header_id|>user<|end_header_id|>\n\nhola")


def test_normalize_question():
    assert data.normalize_question("  ¿Cuál es la Ord. N° 1549?  ") == "cual es la ord n 1549"
    assert data.normalize_question("CUÁL ES la Ord. N° 1549") == data.normalize_question("¿cual es la ord n 1549?")


# --------------------------------------------------------------------------------------------
# Datasets for training and the loss mask
# --------------------------------------------------------------------------------------------


def test_prompt_completion_dataset_has_trl_columns():
    records = data.load_records(FIXTURES / "clean_messages.jsonl")
    dataset = data.to_prompt_completion(records)
    assert set(dataset.column_names) == {"prompt", "completion", "id", "topic", "kind", "keywords"}
    row = dataset[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert [m["role"] for m in row["completion"]] == ["assistant"]


def test_text_dataset_renders_the_chat_template(embedded_tokenizer):
    records = data.load_records(FIXTURES / "clean_messages.jsonl")
    dataset = data.to_text_dataset(records, embedded_tokenizer)
    assert dataset.column_names == ["text"]
    text = dataset[0]["text"]
    assert text.startswith("<|im_start|>system\n") and records[0]["messages"][2]["content"] in text


@pytest.mark.parametrize("which", ["llama_tokenizer", "embedded_tokenizer"])
def test_completion_mask_covers_exactly_the_answer_and_end_of_turn(request, which):
    tokenizer = request.getfixturevalue(which)
    messages = data.load_records(FIXTURES / "clean_messages.jsonl")[0]["messages"]
    input_ids, mask = data.completion_mask(tokenizer, messages)
    assert len(input_ids) == len(mask) and mask == sorted(mask)  # zeros, then ones
    trained = tokenizer.decode([t for t, m in zip(input_ids, mask) if m])
    assert trained.startswith(messages[2]["content"])
    assert tokenizer.eos_token in trained  # the model learns to stop
    assert messages[1]["content"] not in trained


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------


def wording(record: dict) -> str:
    return data.normalize_question(data.question_of(record["messages"]))


@pytest.mark.parametrize("seed", range(5))
def test_split_has_no_leakage_and_teaches_every_held_out_fact(seed):
    records = data.corpus_records(data.load_corpus(SMALL_CORPUS))
    splits = data.split_records(records, seed=seed, test_fraction=0.2, validation_fraction=0.2)
    assert list(splits) == ["train", "validation", "test"]
    assert sum(len(s) for s in splits.values()) == len(records) and splits["test"] and splits["validation"]
    for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not {wording(r) for r in splits[first]} & {wording(r) for r in splits[second]}, (first, second)
    taught = {f for r in splits["train"] for f in r["facts"]}
    assert all(f in taught for name in data.HELD_OUT for r in splits[name] for f in r["facts"])
    for fact in {r["facts"][0] for r in records if r["kind"] == "fact"}:
        in_train = sum(r["facts"] == [fact] and r["kind"] == "fact" for r in splits["train"])
        assert in_train >= data.MIN_TRAIN_QUESTIONS_PER_FACT


@pytest.mark.parametrize("seed", range(5))
def test_held_out_splits_take_whole_items_and_single_fact_questions(seed):
    records = data.corpus_records(data.load_corpus(SMALL_CORPUS))
    splits = data.split_records(records, seed=seed, test_fraction=0.2, validation_fraction=0.2)
    home = {r["id"]: name for name, rs in splits.items() for r in rs}
    items: dict[str, set[str]] = {}
    for record in records:
        items.setdefault(record["id"].rsplit("-q", 1)[0], set()).add(home[record["id"]])
    for item, where in items.items():
        if not item.startswith("F"):  # combined and out-of-scope items never straddle two splits
            assert len(where) == 1, (item, where)
    assert {r["kind"] for name in data.HELD_OUT for r in splits[name]} == set(data.KINDS) - {"combined"}


def test_check_split_names_every_pair_that_shares_a_wording():
    records = data.corpus_records(data.load_corpus(SMALL_CORPUS))
    splits = data.split_records(records, seed=3, test_fraction=0.2, validation_fraction=0.2)
    data.check_split(splits)  # the built split passes
    leaked = {**splits, "test": splits["test"] + [splits["validation"][0]]}
    with pytest.raises(data.DatasetError, match=f"test {splits['validation'][0]['id']} has the wording of "
                                                f"validation {splits['validation'][0]['id']}"):
        data.check_split(leaked)
    untaught = {"train": [r for r in splits["train"] if "F003" not in r["facts"]],
                "validation": [r for r in records if r["facts"] == ["F003"]][:1], "test": []}
    with pytest.raises(data.DatasetError, match="validation F003-q\\d asks about fact F003"):
        data.check_split(untaught)


@pytest.mark.parametrize("test_fraction,validation_fraction,fragment", [
    (0.0, 0.1, "test_fraction=0.0"), (0.1, 0.5, "validation_fraction=0.5"), (0.3, 0.3, "at least half"),
])
def test_bad_fractions_name_the_option(test_fraction, validation_fraction, fragment):
    records = data.corpus_records(data.load_corpus(SMALL_CORPUS))
    with pytest.raises(ValueError, match=fragment):
        data.split_records(records, test_fraction=test_fraction, validation_fraction=validation_fraction)


def test_build_validation_fraction_option_sizes_validation(tmp_path, monkeypatch, capsys):
    sizes = {}
    for share in ("0.1", "0.3"):
        out = tmp_path / share
        monkeypatch.setattr(data.cli, "build_dataset", functools.partial(
            data.build_dataset, train_path=out / "tr.jsonl", validation_path=out / "va.jsonl",
            test_path=out / "te.jsonl", readme=None))
        assert data.main(["build", "--corpus", str(SMALL_CORPUS), "--test-fraction", "0.15",
                          "--validation-fraction", share]) == 0
        sizes[share] = len(data.load_records(out / "va.jsonl"))
    assert sizes["0.1"] < sizes["0.3"]
    assert "va.jsonl" in capsys.readouterr().out
    assert data.main(["build", "--validation-fraction", "0.6"]) == 2
    assert "--validation-fraction=0.6" in capsys.readouterr().err


def build_into(folder: Path, seed: int, **kwargs) -> tuple[bytes, bytes, bytes]:
    paths = folder / "train.jsonl", folder / "validation.jsonl", folder / "test.jsonl"
    data.build_dataset(seed=seed, corpus_path=SMALL_CORPUS, train_path=paths[0], validation_path=paths[1],
                       test_path=paths[2], **{"test_fraction": 0.2, "validation_fraction": 0.2, "readme": None,
                                              **kwargs})
    return tuple(p.read_bytes() for p in paths)


def test_split_is_reproducible_and_seeded(tmp_path):
    runs = {run: build_into(tmp_path / run, seed) for run, seed in (("a", 7), ("b", 7), ("c", 8))}
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_build_updates_only_the_counts_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Datos\n\nantes\n{data.COUNTS_START}\nviejo\n{data.COUNTS_END}\ndespués\n", encoding="utf-8")
    build_into(tmp_path, 1, readme=readme)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Datos\n\nantes\n") and text.endswith(f"{data.COUNTS_END}\ndespués\n")
    splits = {name: data.load_records(tmp_path / f"{name}.jsonl") for name in data.SPLITS}
    sizes = " | ".join(str(len(splits[name])) for name in data.SPLITS)
    assert "viejo" not in text and "| `fact` |" in text and f"| **total** | {sizes} | 27 |" in text
    assert "--validation-fraction 0.2" in text and "| kind | validation | test |" in text


def test_verbatim_answers_are_the_held_out_fact_questions():
    records = data.corpus_records(data.load_corpus(SMALL_CORPUS))
    splits = data.split_records(records, seed=2, test_fraction=0.2, validation_fraction=0.2)
    for name in data.HELD_OUT:
        verbatim = data.verbatim_answer_ids(splits["train"], splits[name])
        assert verbatim == [r["id"] for r in splits[name] if r["kind"] == "fact"]
    table = data.verbatim_answer_table(splits)
    n_fact = sum(r["kind"] == "fact" for r in splits["test"])
    assert list(table.columns) == ["validation", "test"] and table.loc["fact", "test"] == f"{n_fact} of {n_fact}"


def test_corpus_problems_are_listed_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        SMALL_CORPUS.read_text(encoding="utf-8")
        .replace("facts: [F001, F002]", "facts: [F001, F999]")
        .replace('keywords: ["1999"]', 'keywords: ["2001"]')
        .replace('"de que año es la 908"', '"¿Qué ordenanza derogó la Ord. 908?"'),
        encoding="utf-8",
    )
    with pytest.raises(data.DatasetError) as info:
        data.load_corpus(bad)
    message = str(info.value)
    assert "F999" in message and "'2001' is not in its own answer" in message and "repeats one of F004" in message


# --------------------------------------------------------------------------------------------
# The shipped corpus
# --------------------------------------------------------------------------------------------


SHIPPED = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "test": TEST_FILE}


def test_shipped_splits_validate_clean():
    for name, path in SHIPPED.items():
        report = data.validate_file(path, other_paths=[p for n, p in SHIPPED.items() if n != name])
        assert report.ok and not report.warnings, report.format()
        assert all(r["kind"] in data.KINDS for r in report.records)
        assert not data.missing_fields(report.records, ("keywords", "kind", "topic", "facts"))


def test_shipped_splits_are_what_the_build_command_writes(tmp_path):
    built = {name: tmp_path / f"{name}.jsonl" for name in SHIPPED}
    summary = data.build_dataset(train_path=built["train"], validation_path=built["validation"],
                                 test_path=built["test"], readme=None)
    for name, path in SHIPPED.items():
        assert built[name].read_bytes() == path.read_bytes(), "run `python -m utils.data build` and commit the result"
    assert 0.10 <= summary["test_share"] <= 0.15 and 0.10 <= summary["validation_share"] <= 0.15
    readme = (REPO_ROOT / "dataset" / "README.md").read_text(encoding="utf-8")
    block = readme.split(data.COUNTS_START)[1].split(data.COUNTS_END)[0]
    records = {name: data.load_records(path) for name, path in built.items()}
    expected = data.counts_markdown(records, data.DEFAULT_SEED, data.DEFAULT_TEST_FRACTION,
                                    data.DEFAULT_VALIDATION_FRACTION)
    assert block.strip() == expected.strip(), "run `python -m utils.data build` and commit dataset/README.md"


def test_shipped_held_out_questions_are_in_no_other_split():
    splits = {name: data.load_records(path) for name, path in SHIPPED.items()}
    for name in data.HELD_OUT:
        assert {r["kind"] for r in splits[name]} == set(data.KINDS), name
    data.check_split(splits)
    assert data.overlap_checks(splits).query("chequeo.str.startswith('misma')")["resultado"].sum() == 0


def test_shipped_held_out_splits_ask_each_fact_at_most_once_and_balance_kinds():
    splits = {name: data.load_records(path) for name, path in SHIPPED.items()}
    for name in data.HELD_OUT:
        facts = [r["facts"][0] for r in splits[name] if r["kind"] == "fact"]
        assert len(facts) == len(set(facts)), f"{name} asks a fact twice"
    kinds = {name: Counter(r["kind"] for r in splits[name]) for name in data.HELD_OUT}
    for kind in data.KINDS:  # the same design: each kind about as large in validation as in test
        assert abs(kinds["validation"][kind] - kinds["test"][kind]) <= max(2, kinds["test"][kind] // 10), kind


def test_shipped_train_file_validates_clean_from_the_command_line(capsys):
    """``python -m utils.data validate`` on the shipped splits, through its entry point in this process (the command
    in its own process, exit code included, is test_ten_kinds_of_damage_are_all_listed_and_the_cli_fails)."""
    from utils.data.cli import main

    code = main(["validate", *map(str, SHIPPED.values())])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert out.out.count(" OK — ") == 3 and ": error:" not in out.out


def test_the_fact_sheet_ships_with_the_dataset_and_the_datasheet_cites_it():
    sheet = REPO_ROOT / "dataset" / "normativa" / "HECHOS.md"
    assert sheet.is_file() and "NO VERIFICADO" in sheet.read_text(encoding="utf-8")
    readme = (REPO_ROOT / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "dataset/normativa/HECHOS.md" in readme and "train_v3_combined_split.jsonl" in readme
    header = data.CORPUS_FILE.read_text(encoding="utf-8").splitlines()[:5]
    assert any("dataset/normativa/HECHOS.md" in line for line in header)


def test_notebook_01_figures_meet_the_print_standard(embedded_tokenizer):
    splits = {name: data.load_records(path)[:40] for name, path in SHIPPED.items()}
    lengths = data.token_lengths(splits, embedded_tokenizer, "SmolLM2-135M-Instruct (embebido)")
    for name, fig in (("01_longitudes_tokens", data_plots.plot_token_lengths(lengths, 512)),
                      ("01_ejemplos_por_tema", data_plots.plot_counts(data.count_table(splits, "topic")))):
        assert check_print_standard(fig, name) >= 8
        shown = " ".join(t.get_text() for t in fig.findobj(Text))
        assert "validación" in shown and "entrenamiento" in shown and "prueba" in shown
        assert not re.search(r"\b(train|validation|test)\b", shown), shown  # Spanish names, no internal ids
        plt.close(fig)


def test_text_lines_in_two_layouts_are_flagged(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    lines = (FIXTURES / "original_text.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    lines += (FIXTURES / "original_newlines.jsonl").read_text(encoding="utf-8").splitlines()[2:3]
    mixed.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = data.validate_file(mixed)
    assert report.ok
    assert [(w.line, "while line 1 is 'llama3'" in w.message) for w in report.warnings] == [(3, True)]


def test_completion_mask_matches_the_labels_trl_builds(tmp_path, embedded_tokenizer):
    from trl import SFTConfig, SFTTrainer

    from utils.modeling import load_model

    embedded_model = load_model("embedded", device="cpu")  # own copy: the trainer may change its config
    records = data.load_records(FIXTURES / "clean_messages.jsonl")
    config = SFTConfig(output_dir=str(tmp_path), max_length=512, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=embedded_model, args=config, train_dataset=data.to_prompt_completion(records),
                         processing_class=embedded_tokenizer)
    for row, record in zip(trainer.train_dataset, records):
        input_ids, mask = data.completion_mask(embedded_tokenizer, record["messages"])
        assert row["input_ids"] == input_ids
        assert [int(label != -100) for label in row["labels"]] == mask
