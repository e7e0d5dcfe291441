"""The command line of the dataset, ``python -m utils.data``::

    python -m utils.data validate FILE [FILE ...] [--tokenizer llama-3.2 | --no-tokenizer] [--max-seq-length 512]
    python -m utils.data convert IN OUT --to messages|text [--layout llama3|newlines] [--force]
    python -m utils.data build [--seed 42] [--test-fraction 0.12] [--validation-fraction 0.12]
    python -m utils.data annotate-template DATA --out fields.csv [--delimiter ';'] [--force]
    python -m utils.data annotate DATA --fields fields.csv --out NEW [--force]

``validate`` reports every problem of every file as ``file:line: severity: what is wrong — how to fix``
and exits 1 when there is an error; it checks token lengths with the thesis model's tokenizer (``llama-3.2``,
shipped with the project) unless told otherwise. A command that cannot run (a bad option, a file it must not
or cannot write) prints one ``error: ...`` line and exits 2. ``build`` reads ``dataset/sources/utn_qa.yaml``
and writes the three split files (train, validation, test) plus the counts block of ``dataset/README.md``.
``annotate-template`` writes the CSV a student fills with ``kind``, ``topic`` and ``keywords`` for their own
data; ``annotate`` writes a new data file with them (``utils.data.annotate``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.data.annotate import annotate_file, write_fields_template
from utils.data.corpus import (
    CORPUS_FILE,
    COUNTS_END,
    COUNTS_START,
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VALIDATION_FRACTION,
    README_FILE,
    SPLITS,
    build_dataset,
    check_fractions,
)
from utils.data.records import BOT, LAYOUTS, DatasetError, TextLayout
from utils.data.tokenizers import as_tokenizer
from utils.data.validate import convert_file, validate_file
from utils.modeling import ModelNotAvailableError

DESCRIPTION = ("The dataset: both JSONL formats, their validation, the converter, the seeded train/validation/test "
               "split and the fields of your own data.")


def _cmd_validate(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.files]
    if args.max_seq_length < 1:
        print(f"error: --max-seq-length {args.max_seq_length}: must be at least 1 (the training's max_seq_length, "
              "512 in the thesis)", file=sys.stderr)
        return 2
    tokenizer = None
    if not args.no_tokenizer:
        try:
            tokenizer = as_tokenizer(args.tokenizer)
        except ModelNotAvailableError as exc:
            print(f"error: --tokenizer {args.tokenizer}: {exc} (or pass --no-tokenizer to skip the length check)",
                  file=sys.stderr)
            return 2
    failed = False
    for k, path in enumerate(paths):
        others = paths[:k] + paths[k + 1:]  # the same file given twice is reported as train = test
        report = validate_file(path, tokenizer=tokenizer, max_seq_length=args.max_seq_length, other_paths=others)
        print(report.format())
        failed |= not report.ok
    if tokenizer is None:
        print("note: token lengths were not checked (--no-tokenizer): an example longer than max_seq_length "
              "would be truncated or dropped in training; drop --no-tokenizer to check them")
    return 1 if failed else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    layout = LAYOUTS[args.layout]
    if args.no_bos:
        layout = TextLayout(False, layout.header_sep, layout.turn_sep, layout.trailing)
    try:
        out = convert_file(args.input, args.output, to=args.to, force=args.force, layout=layout)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.to} format)")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        check_fractions(args.test_fraction, args.validation_fraction)
    except ValueError as exc:
        option = str(exc).replace("test_fraction", "--test-fraction").replace("validation_fraction",
                                                                             "--validation-fraction")
        print(f"error: {option}", file=sys.stderr)
        return 2
    try:
        summary = build_dataset(seed=args.seed, test_fraction=args.test_fraction, corpus_path=args.corpus,
                                validation_fraction=args.validation_fraction)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {exc.filename or 'the split files'} ({exc.strerror or exc}) — each file is "
              "either as before or fully written (atomic writes); free disk space or check the folder's "
              "permissions, then run build again",
              file=sys.stderr)
        return 2
    for name in SPLITS:
        print(f"wrote {summary[f'{name}_path']} ({summary[name]} examples, {summary[f'{name}_share']:.1%} of all)")
    if summary["readme_updated"]:
        print(f"updated the counts block of {README_FILE}")
    else:
        print(f"warning: {README_FILE} has no {COUNTS_START} ... {COUNTS_END} block; counts not written",
              file=sys.stderr)
    return 0


def _cmd_annotate_template(args: argparse.Namespace) -> int:
    try:
        out = write_fields_template(args.data, args.out, delimiter=args.delimiter, force=args.force)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out} ({exc.strerror or exc}) — free disk space, check the folder's "
              "permissions or choose another path", file=sys.stderr)
        return 2
    print(f"wrote {out}: fill kind (fact, combined or out_of_scope), topic and keywords (separated by ';'), "
          f"then run `python -m utils.data annotate {args.data} --fields {out} --out NEW.jsonl`")
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    try:
        summary = annotate_file(args.data, args.fields, args.out, force=args.force)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {summary['path']} ({summary['records']} examples, {summary['annotated']} annotated)")
    if summary["missing"]:
        print(f"warning: some examples still lack {', '.join(summary['missing'])}: the metrics and figures that "
              "need them are skipped with a message — fill those rows of the CSV and run annotate again",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m utils.data`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="python -m utils.data", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="report every problem of JSONL files (train and test together: overlap)")
    p.add_argument("files", nargs="+")
    p.add_argument("--tokenizer", default="llama-3.2",
                   help="check lengths with this tokenizer: llama-3.2 (default, the thesis model's, shipped "
                        "offline), embedded, a hub id or folder")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the token-length check (says so)")
    p.add_argument("--max-seq-length", type=int, default=512, help="max_seq_length of the training (default 512)")
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
    p = sub.add_parser("build", help="write the train/validation/test split files from the corpus YAML")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help=f"share of the questions held out for test (default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                   help=f"share held out for validation, same design as test (default {DEFAULT_VALIDATION_FRACTION})")
    p.add_argument("--corpus", default=str(CORPUS_FILE), help="corpus YAML (default: dataset/sources/utn_qa.yaml)")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("annotate-template", help="write the CSV to fill with kind, topic and keywords of DATA")
    p.add_argument("data", help="your JSONL file (messages or text format)")
    p.add_argument("--out", required=True, help="the CSV to write, e.g. fields.csv")
    p.add_argument("--delimiter", choices=[",", ";"], default=",",
                   help="between cells: ',' (default) or ';' (Excel with a decimal comma, e.g. es-AR)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CSV (never the data file)")
    p.set_defaults(func=_cmd_annotate_template)
    p = sub.add_parser("annotate", help="write a copy of DATA with the kind, topic and keywords of a filled CSV")
    p.add_argument("data", help="your JSONL file (messages or text format)")
    p.add_argument("--fields", required=True, help="the filled CSV (columns line or id, question, kind, topic, "
                                                   "keywords separated by ';')")
    p.add_argument("--out", required=True, help="the new JSONL file (never the data file itself)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file (never an input)")
    p.set_defaults(func=_cmd_annotate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m utils.data``."""
    args = build_parser().parse_args(argv)
    return args.func(args)
