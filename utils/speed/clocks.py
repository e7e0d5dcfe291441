"""The GPU's SM clock and power while benchmark rows take turns (``tools/gpu_clocks.sh`` samples them): reading
``nvidia-smi``'s CSV and the rows' BEGIN/END marks, and each row's and each dtype's summary.

A training step at micro-batch 32 keeps the tensor cores busy long enough to reach the card's power limit; there the
clock depends on the power each operation draws. ``summarise`` keeps the samples drawing at least half the limit
(the steps; loading a model draws a fraction of it) and gives their median SM clock and power, and the share the
driver reports as held back by the power cap (``clocks_event_reasons.active`` bit 0x4, "SW power cap").
``tools/gpu_clocks.py`` writes the summary as JSON; notebook 04 draws the samples (``utils.plotting.speed``).
"""

from __future__ import annotations

import csv
import datetime as dt
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"
POWER_CAP_BIT = 0x4  # clocks_event_reasons: "SW power cap"
FIELDS = {"timestamp": "timestamp", "sm_mhz": "clocks.current.sm [MHz]", "power_w": "power.draw [W]",
          "power_limit_w": "power.limit [W]"}
REASONS = "clocks_event_reasons.active"
DTYPE = re.compile(r"_(fp16|bf16|fp32)$")
TOKENS = re.compile(r":\s+([\d,]+) tokens/s")


@dataclass(frozen=True)
class Sample:
    time: dt.datetime
    sm_mhz: float
    power_w: float
    power_limit_w: float
    reasons: int | None


@dataclass(frozen=True)
class Segment:
    name: str
    start: dt.datetime
    end: dt.datetime
    tokens_per_second: float | None


def _number(cell: str, unit: str) -> float:
    return float(cell.strip().removesuffix(unit).strip())


def read_samples(path: Path) -> list[Sample]:
    """``nvidia-smi --query-gpu=timestamp,clocks.sm,...,power.draw,power.limit[,...] --format=csv`` output."""
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty; expected nvidia-smi's CSV with a header line.")
    header = [cell.strip() for cell in rows[0]]
    missing = [name for name in FIELDS.values() if name not in header]
    if missing:
        raise ValueError(f"{path}, line 1: no column {missing}; query at least "
                         f"{','.join(f.split(' [')[0].replace('current.', '') for f in FIELDS.values())}.")
    at = {key: header.index(name) for key, name in FIELDS.items()}
    reasons_at = header.index(REASONS) if REASONS in header else None
    samples = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        try:
            samples.append(Sample(
                time=dt.datetime.strptime(row[at["timestamp"]].strip(), TIME_FORMAT),
                sm_mhz=_number(row[at["sm_mhz"]], "MHz"), power_w=_number(row[at["power_w"]], "W"),
                power_limit_w=_number(row[at["power_limit_w"]], "W"),
                reasons=int(row[reasons_at].strip(), 16) if reasons_at is not None else None))
        except (ValueError, IndexError) as error:
            raise ValueError(f"{path}, line {line}: not a sample of nvidia-smi's CSV ({error}): {row!r}") from None
    return samples


def read_segments(path: Path) -> list[Segment]:
    """``BEGIN <row> <date> <time>`` … the benchmark's ``<row>: N tokens/s`` line … ``END <row> <date> <time>``."""
    segments, open_ = [], None
    tokens = None
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        words = line.split()
        if words[:1] in (["BEGIN"], ["END"]):
            if len(words) != 4:
                raise ValueError(f"{path}, line {line_no}: expected '{words[0]} <row> <YYYY/MM/DD> <HH:MM:SS.mmm>'.")
            try:
                when = dt.datetime.strptime(f"{words[2]} {words[3]}", TIME_FORMAT)
            except ValueError:
                raise ValueError(f"{path}, line {line_no}: the time {words[2]} {words[3]!r} is not "
                                 f"YYYY/MM/DD HH:MM:SS.mmm.") from None
            if words[0] == "BEGIN":
                if open_ is not None:
                    raise ValueError(f"{path}, line {line_no}: BEGIN {words[1]} before END {open_[0]}.")
                open_, tokens = (words[1], when), None
            else:
                if open_ is None or open_[0] != words[1]:
                    raise ValueError(f"{path}, line {line_no}: END {words[1]} without its BEGIN.")
                segments.append(Segment(words[1], open_[1], when, tokens))
                open_ = None
        elif open_ is not None and (match := TOKENS.search(line)):
            tokens = float(match[1].replace(",", ""))
    if open_ is not None:
        raise ValueError(f"{path}: BEGIN {open_[0]} has no END (the run was cut: drop that row or rerun it).")
    if not segments:
        raise ValueError(f"{path}: no BEGIN/END pair.")
    return segments


def row_samples(samples: list[Sample], segment: Segment) -> list[Sample]:
    """The samples taken between a row's BEGIN and END marks."""
    return [s for s in samples if segment.start <= s.time <= segment.end]


def busy(samples: list[Sample], fraction: float) -> list[Sample]:
    """The samples drawing at least ``fraction`` of the power limit: the steps, not the model's loading."""
    return [s for s in samples if s.power_w >= fraction * s.power_limit_w]


def _describe(samples: list[Sample]) -> dict:
    clocks = [s.sm_mhz for s in samples]
    capped = [s for s in samples if s.reasons is not None and s.reasons & POWER_CAP_BIT]
    known = [s for s in samples if s.reasons is not None]
    return {
        "busy_samples": len(samples),
        "sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks), "sm_mhz_max": max(clocks),
        "power_w_median": statistics.median(s.power_w for s in samples),
        "power_limit_w": max(s.power_limit_w for s in samples),
        "power_capped_fraction": round(len(capped) / len(known), 3) if known else None,
    }


def summarise(samples: list[Sample], segments: list[Segment], busy_fraction: float = 0.5) -> dict:
    """Per row and per dtype: the samples within the row's marks that draw ≥ ``busy_fraction`` of the power limit."""
    rows, by_dtype = [], {}
    for seg in segments:
        inside = row_samples(samples, seg)
        if not inside:
            raise ValueError(f"row {seg.name}: no nvidia-smi sample between {seg.start} and {seg.end}; the two "
                             "files must use one clock (run with TZ=UTC).")
        steps = busy(inside, busy_fraction)
        if not steps:
            raise ValueError(f"row {seg.name}: none of its {len(inside)} samples draws {busy_fraction:.0%} of the "
                             "power limit; did the row fail? (its benchmark line is in the marks file)")
        match = DTYPE.search(seg.name)
        dtype = match[1] if match else "other"
        by_dtype.setdefault(dtype, []).extend(steps)
        rows.append({"name": seg.name, "dtype": dtype, "start": seg.start.isoformat(), "end": seg.end.isoformat(),
                     "tokens_per_second": seg.tokens_per_second, "samples": len(inside), **_describe(steps)})
    dtypes = {dtype: _describe(steps) for dtype, steps in by_dtype.items()}
    out = {"busy_fraction_of_power_limit": busy_fraction, "rows": rows, "dtypes": dtypes}
    if {"fp16", "bf16"} <= dtypes.keys():
        out["bf16_over_fp16_sm_mhz"] = round(dtypes["bf16"]["sm_mhz_median"] / dtypes["fp16"]["sm_mhz_median"], 4)
    return out
