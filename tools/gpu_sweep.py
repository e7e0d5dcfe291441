"""Recipe sweep on a GPU: which change makes the embedded model's adapter generalise, measured on validation.

The GPU counterpart of ``tools/recipe_sweep.py`` (same splits, same scoring), for recipes a 2-core CPU cannot
afford: each variant runs in its own process (so several share one GPU), trains the embedded model with its
overrides, logs the validation loss along the way, answers every validation question greedily and is scored with
the sweep's metrics. ``collect`` gathers the variants into one result file with provenance::

    python tools/gpu_sweep.py run --variant thesis_nf4 --work-dir /tmp/sweep      # one variant (GPU)
    python tools/gpu_sweep.py collect --work-dir /tmp/sweep --out results/04_recipe_sweep_gpu.json
    python tools/gpu_sweep.py list
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import recipe_sweep as sweep  # noqa: E402
from utils.data.records import write_jsonl  # noqa: E402
from utils.files import read_json, save_json  # noqa: E402
from utils.inference import generate_answers, load_trained, prompt_of  # noqa: E402
from utils.paths import HISTORY_FILE  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402
from utils.training.cli import profile_settings  # noqa: E402
from utils.training.run import train  # noqa: E402

THESIS = {"model_name": "embedded", "learning_rate": 1e-4, "per_device_train_batch_size": 1,
          "gradient_accumulation_steps": 2, "max_steps": 2000, "warmup_steps": 100}


def _epochs(lr: float, epochs: float, batch: int = 8, train_examples: int = 814, **extra: Any) -> dict[str, Any]:
    """Overrides for ``epochs`` passes over the train split at effective batch ``batch`` (micro-batch = batch)."""
    steps = max(1, round(epochs * train_examples / batch))
    return {"model_name": "embedded", "learning_rate": lr, "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1, "max_steps": steps, "warmup_steps": max(1, steps // 20), **extra}


# name -> (note, overrides, answers ("full" | "short"), score the base model too)
VARIANTS: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "thesis_nf4": ("the thesis recipe unchanged (NF4 + DQ, lr 1e-4, 1 x 2, 2000 steps)",
                   {**THESIS, "quantization": "nf4_dq"}, "full", False),
    "thesis_none": ("the thesis recipe on the unquantised (bf16) base",
                    {**THESIS, "quantization": "none"}, "full", False),
    "lr1e3_e3_none": ("lr 1e-3, batch 8, 3 epochs, unquantised", _epochs(1e-3, 3, quantization="none"),
                      "full", True),
    "lr1e3_e3_nf4": ("lr 1e-3, batch 8, 3 epochs, NF4 + DQ", _epochs(1e-3, 3, quantization="nf4_dq"),
                     "full", True),
    "lr3e4_e3_none": ("lr 3e-4, batch 8, 3 epochs, unquantised", _epochs(3e-4, 3, quantization="none"),
                      "full", False),
    "lr1e3_e6_none": ("lr 1e-3, batch 8, 6 epochs, unquantised", _epochs(1e-3, 6, quantization="none"),
                      "full", False),
    "lr1e3_e3_r8_none": ("lr 1e-3, batch 8, 3 epochs, r 8 / alpha 16, unquantised",
                         _epochs(1e-3, 3, quantization="none", lora_r=8, lora_alpha=16), "full", False),
    "lr1e3_e3_short_none": ("lr 1e-3, batch 8, 3 epochs, unquantised, answers cut to their first sentence",
                            _epochs(1e-3, 3, quantization="none"), "short", False),
    "lr2e3_e05_none": ("lr 2e-3, batch 8, half an epoch, unquantised (what a 2-core CPU affords)",
                       _epochs(2e-3, 0.5, quantization="none"), "full", False),
    "lr1e3_e1_none": ("lr 1e-3, batch 8, 1 epoch, unquantised", _epochs(1e-3, 1, quantization="none"),
                      "full", False),
    "lr2e3_e1_none": ("lr 2e-3, batch 8, 1 epoch, unquantised", _epochs(2e-3, 1, quantization="none"),
                      "full", False),
    "lr2e4_e3_none": ("lr 2e-4, batch 8, 3 epochs, unquantised", _epochs(2e-4, 3, quantization="none"),
                      "full", False),
    "lr1e3_e3_b16_none": ("lr 1e-3, batch 16, 3 epochs, unquantised",
                          _epochs(1e-3, 3, batch=16, quantization="none"), "full", False),
}


def train_one(name: str, overrides: dict[str, Any], train_file: Path, validation_file: Path, run_dir: Path,
              tiny: bool) -> dict[str, Any]:
    """Train one variant with the validation loss every tenth of the run; the log history comes back too."""
    steps = 1 if tiny else int(overrides["max_steps"])
    settings = profile_settings(
        "thesis", **{**overrides, "max_steps": steps, "warmup_steps": 0 if tiny else overrides["warmup_steps"]},
        train_file=str(train_file), validation_file=str(validation_file), output_dir=str(run_dir),
        eval_steps=max(1, steps // 10), eval_limit=4 if tiny else 0, per_device_eval_batch_size=16,
        logging_steps=max(1, steps // 100), save_steps=steps, save_total_limit=1, resume=False)
    wall = time.perf_counter()
    result = train(settings, verbose=False)
    history = pd.read_csv(run_dir / HISTORY_FILE)
    curve = history[["step", "loss", "eval_loss"]].astype(float)
    return {"train_wall_s": round(time.perf_counter() - wall, 1),
            "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str, type(None)))},
            "curve": {col: [None if v != v else round(v, 4) for v in curve[col]] for col in curve.columns}}


def answer(run_dir: Path, records: list[dict], max_new_tokens: int, adapter: bool) -> list[dict]:
    """Greedy answers to every record, with or without the adapter, on the default device."""
    model, tokenizer = load_trained(run_dir)
    outputs = generate_answers(model, tokenizer, [prompt_of(r) for r in records], max_new_tokens,
                               batch_size=32, adapter=adapter, progress=False)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return outputs


def run_variant(args: argparse.Namespace) -> int:
    """Train, answer and score one variant; write ``<work>/<name>.json``."""
    note, overrides, answers_kind, with_base = VARIANTS[args.variant]
    splits = sweep.build_splits(sweep.CORPUS_FILE, 42, 0.12)
    validation = splits["validation"][:4] if args.tiny else splits["validation"]
    work = args.work_dir / args.variant
    work.mkdir(parents=True, exist_ok=True)
    variant = sweep.Variant(args.variant, note, answers=answers_kind)
    train_file = write_jsonl(sweep.variant_train_records(variant, splits["train"], sweep.BEFORE_REF),
                             work / "train.jsonl")
    validation_file = write_jsonl(validation, work / "validation.jsonl")
    entry: dict[str, Any] = {"name": args.variant, "note": note, "overrides": overrides, "answers": answers_kind,
                             "train_examples": len(splits["train"]), "validation_examples": len(validation)}
    entry.update(train_one(args.variant, overrides, train_file, validation_file, work / "run", args.tiny))
    tokens = 8 if args.tiny else args.max_new_tokens
    start = time.perf_counter()
    outputs = answer(work / "run", validation, tokens, adapter=True)
    entry.update(answer_wall_s=round(time.perf_counter() - start, 1), metrics=sweep.score_answers(validation, outputs),
                 samples=sweep.sample_answers(validation, outputs, per_kind=3))
    if with_base:
        base = answer(work / "run", validation, tokens, adapter=False)
        entry["base"] = {"metrics": sweep.score_answers(validation, base),
                         "samples": sweep.sample_answers(validation, base, per_kind=3)}
    entry["provenance"] = result_provenance()
    save_json(entry, args.work_dir / f"{args.variant}.json")
    print(f"[{args.variant}] {entry['metrics']}", flush=True)
    return 0


def collect(args: argparse.Namespace) -> int:
    """Every ``<work>/<variant>.json`` into one result file (variants that did not finish are listed)."""
    done = {p.stem: read_json(p) for p in sorted(args.work_dir.glob("*.json"))}
    result = {"what": "recipe sweep of the embedded model on a GPU, scored on the validation split",
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "variants": done, "missing": [n for n in VARIANTS if n not in done]}
    save_json(result, args.out)
    for name, entry in done.items():
        m = entry["metrics"]
        print(f"{name:22s} kw_fact={m['keyword_recall_fact']} kw_comb={m['keyword_recall_combined']} "
              f"oos={m['refusal_oos']} wrongful={m['wrongful_refusal']} norm={m['norm_recall']} "
              f"stop={m['stop_rate']} train_s={entry['train_wall_s']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``list``, ``run --variant NAME`` or ``collect``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("list", "run", "collect"))
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gpu_sweep"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "04_recipe_sweep_gpu.json")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--tiny", action="store_true", help="1 step, 4 questions, 8 tokens: checks the logic")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "list":
        for name, (note, *_rest) in VARIANTS.items():
            print(f"{name:22s} {note}")
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return run_variant(args) if args.command == "run" else collect(args)


if __name__ == "__main__":
    sys.exit(main())
