"""What a resume did to the fast-path `off` runs of issue #18: their LoRA weights went from bf16 to fp32.

The two `off` runs (seeds 42 and 43) trained to step 1000 in one session, were resumed from ``checkpoint-1000`` in
another (commit ``0fc93ae``) and stopped at step ~1400. TRL keeps a 4-bit model's LoRA weights in bf16; the
resume reloaded them through PEFT's ``load_adapter``, which upcasts them to fp32 (fixed since:
``utils.training.keep_trainable_dtypes``). This script puts the evidence in one file:

- the adapter's dtype in each checkpoint (read from the safetensors header);
- the validation loss of each `off` run against the `auto` run of the same seed (``results/gpu``,
  ``results/gpu-auto-s43``, bf16 weights from start to end), step by step.

    .venv/bin/python tools/resume_upcast.py --runs /path/to/folder/with/gpu-off-s42/and/gpu-off-s43

Writes ``results/04_resume_upcast_h200.json``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402

from utils.files import save_json  # noqa: E402
from utils.paths import CHECKPOINTS_DIR, HISTORY_FILE, RESULTS_DIR, resolve_path  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402

AUTO_RUNS = {42: "gpu", 43: "gpu-auto-s43"}
RESUMED_AT = 1000
FIRST_STEP = 500  # the comparison's first step: half-way to the resume


def safetensors_dtypes(path: Path) -> dict[str, int]:
    """Number of tensors per dtype in a safetensors file, from its JSON header (nothing else is read)."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    counts: dict[str, int] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    return counts


def eval_losses(run: Path) -> pd.Series:
    """Validation loss by step from a run's log history (``04_log_history.csv``)."""
    history = pd.read_csv(run / HISTORY_FILE)
    rows = history.dropna(subset=["eval_loss"])
    return rows.drop_duplicates("step", keep="last").set_index("step")["eval_loss"]


def compare(off: pd.Series, auto: pd.Series, first_step: int) -> list[dict]:
    """Rows ``step, off, auto, off - auto`` from ``first_step`` on, steps both runs evaluated."""
    steps = [step for step in off.index if step >= first_step and step in auto.index]
    return [{"step": int(step), "off": round(float(off[step]), 4), "auto": round(float(auto[step]), 4),
             "off_minus_auto": round(float(off[step] - auto[step]), 4)} for step in steps]


def report(runs: Path, first_step: int = FIRST_STEP) -> dict:
    """The adapter dtypes and the loss comparison for both seeds."""
    seeds = {}
    for seed, auto_run in AUTO_RUNS.items():
        run = runs / f"gpu-off-s{seed}"
        checkpoints = sorted((run / CHECKPOINTS_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        rows = compare(eval_losses(run), eval_losses(RESULTS_DIR / auto_run), first_step)
        before = [r["off_minus_auto"] for r in rows if r["step"] <= RESUMED_AT]
        after = [r for r in rows if r["step"] > RESUMED_AT]
        seeds[str(seed)] = {
            "auto_run": f"results/{auto_run}",
            "adapter_dtypes": {p.name: safetensors_dtypes(p / "adapter_model.safetensors") for p in checkpoints},
            "validation_loss": rows,
            "max_abs_gap_up_to_resume": max(abs(v) for v in before),
            "gap_at_last_step": after[-1]["off_minus_auto"] if after else None,
        }
    return {
        "what": ("fast-path `off` runs of the `gpu` profile resumed at step 1000 with their LoRA weights upcast "
                 "from bf16 to fp32 by PEFT's load_adapter, against the `auto` runs (bf16 weights throughout)"),
        "resumed_at": RESUMED_AT,
        "source": {"device": "NVIDIA H200", "date": "2026-12-03",
                   "commits": {"steps 0-1000": "2c4ce5a", "steps 1000-1400": "0fc93ae"},
                   "command": ("python -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s<seed> "
                               "--set 04.fast_path=off [--set 04.seed=43] --set '05.baselines=[]' "
                               "--set 05.export_gguf=false (tools/gpu_campaign/series.sh launch gpu-off-s<seed>)")},
        "seeds": seeds,
        **result_provenance(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder holding gpu-off-s42/ and gpu-off-s43/")
    parser.add_argument("--out", default=str(RESULTS_DIR / "04_resume_upcast_h200.json"))
    args = parser.parse_args(argv)
    result = report(args.runs)
    path = save_json(result, resolve_path(args.out))
    for seed, entry in result["seeds"].items():
        print(f"seed {seed}: dtypes {entry['adapter_dtypes']}; off - auto over steps {FIRST_STEP}-{RESUMED_AT}: "
              f"at most {entry['max_abs_gap_up_to_resume']:.4f}; at the last step: {entry['gap_at_last_step']:+.4f}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
