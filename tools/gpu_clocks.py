"""The GPU's SM clock and power while benchmark rows take turns: does fp16 run at a lower clock than bf16?

The fast path's step is 3.5 % slower in fp16 than in bf16 on an H200 (``results/04_speed_strict8_mb36.json``). The
profiles put 11.1 of fp16's 12.4 extra GPU milliseconds in the GEMMs (``results/04_profile_h200_fp16_bf16.log``),
yet the same GEMMs timed alone run at one speed in both dtypes (``results/04_gemm_dtypes_nvidia_h200.json``). A
training step keeps the tensor cores busy long enough to reach the card's power limit; there the clock depends on
the power each operation draws.

``tools/gpu_clocks.sh`` samples ``nvidia-smi`` every 200 ms while rows run one after another, each its own benchmark
invocation between ``BEGIN``/``END`` lines of a marks file. This script summarises each row's samples: those drawing
at least half the power limit (the steps; loading a model draws a fraction of it), their median SM clock and power,
and how many of them the driver reports as held back by the power cap (``clocks_event_reasons.active`` bit 0x4,
"SW power cap"). Then the same per dtype::

    bash tools/gpu_clocks.sh /tmp/twin /tmp/clocks fast_mb32_keep_input_fp16 fast_mb32_keep_input_bf16   # on the GPU
    .venv/bin/python tools/gpu_clocks.py /tmp/clocks/smi.csv /tmp/clocks/marks.txt --out results/04_gpu_clocks.json

Both files must use one clock: the script writes the marks with ``date -u`` and ``nvidia-smi`` its timestamps in the
machine's local time, so run it where that is UTC (the GPU machines are) or set ``TZ=UTC``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from utils.files import save_json  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402
from utils.speed.clocks import read_samples, read_segments, summarise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("smi", type=Path, help="nvidia-smi's CSV (tools/gpu_clocks.sh: <out>/smi.csv)")
    parser.add_argument("marks", type=Path, help="BEGIN/END marks of each row (tools/gpu_clocks.sh: <out>/marks.txt)")
    parser.add_argument("--busy-fraction", type=float, default=0.5,
                        help="samples drawing at least this fraction of the power limit count (default 0.5)")
    parser.add_argument("--device", default="", help="the GPU the samples come from, recorded in the JSON")
    parser.add_argument("--note", default="", help="how and where the samples were taken, recorded in the JSON")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = parser.parse_args(argv)
    for path in (args.smi, args.marks):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    if not 0 < args.busy_fraction < 1:
        parser.error("--busy-fraction must lie between 0 and 1")
    try:
        summary = summarise(read_samples(args.smi), read_segments(args.marks), args.busy_fraction)
    except ValueError as error:
        parser.error(str(error))
    report = {"label": "SM clock and power draw of one GPU while benchmark rows take turns (nvidia-smi every 200 ms)",
              **result_provenance(), "sampled_on": args.device, "note": args.note,
              "smi_file": args.smi.name, "marks_file": args.marks.name, **summary}
    out = save_json(report, args.out)
    for row in summary["rows"]:
        print(f"{row['name']:<34} {row['busy_samples']:>3} busy samples  SM {row['sm_mhz_median']:6.0f} MHz "
              f"(min {row['sm_mhz_min']:.0f})  {row['power_w_median']:5.1f} W of {row['power_limit_w']:.0f}  "
              f"power-capped {row['power_capped_fraction']}")
    if "bf16_over_fp16_sm_mhz" in summary:
        print(f"median SM clock, bf16 / fp16: {summary['bf16_over_fp16_sm_mhz']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
