"""utils.speed.clocks and tools/gpu_clocks.py: reading nvidia-smi's samples and the rows' marks, the per-row and
per-dtype summary, the committed H200 summary recomputed from its raw files, and one clear error for each kind of
bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from utils.files import read_json
from utils.paths import REPO_ROOT, RESULTS_DIR
from utils.speed import clocks as gpu_clocks


HEADER = ("timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], power.limit [W], "
          "temperature.gpu, clocks_event_reasons.active")


def _sample(second: float, mhz: int, watts: float, reasons: str = "0x0000000000000004") -> str:
    return f"2026/12/05 02:00:{second:06.3f}, {mhz} MHz, 3201 MHz, {watts:.2f} W, 700.00 W, 50, {reasons}"


def _marks(*rows: tuple[str, float, float, str]) -> str:
    lines = []
    for name, start, end, tokens in rows:
        lines += [f"BEGIN {name} 2026/12/05 02:00:{start:06.3f}",
                  f"[benchmark]      {name}:    {tokens} tokens/s  0.6 s/step",
                  f"END {name} 2026/12/05 02:00:{end:06.3f}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def files(tmp_path):
    samples = [_sample(1.0, 1980, 120.0, "0x0000000000000000"),  # loading the model: below half the limit
               _sample(2.0, 1500, 690.0), _sample(3.0, 1540, 695.0), _sample(4.0, 1560, 697.0, "0x0000000000000000"),
               _sample(11.0, 1980, 130.0, "0x0000000000000000"),
               _sample(12.0, 1600, 690.0), _sample(13.0, 1640, 699.0)]
    smi = tmp_path / "smi.csv"
    smi.write_text(HEADER + "\n" + "\n".join(samples) + "\n")
    marks = tmp_path / "marks.txt"
    marks.write_text(_marks(("fast_mb32_fp16", 0.5, 5.0, "26,902"), ("fast_mb32_bf16", 10.5, 14.0, "27,771")))
    return smi, marks


def test_each_row_counts_only_its_samples_at_half_the_power_limit_or_more(files):
    summary = gpu_clocks.summarise(gpu_clocks.read_samples(files[0]), gpu_clocks.read_segments(files[1]))
    fp16, bf16 = summary["rows"]
    assert (fp16["name"], fp16["dtype"], fp16["tokens_per_second"]) == ("fast_mb32_fp16", "fp16", 26902.0)
    assert fp16["samples"] == 4 and fp16["busy_samples"] == 3  # the 120 W sample is the model loading
    assert fp16["sm_mhz_median"] == 1540 and (fp16["sm_mhz_min"], fp16["sm_mhz_max"]) == (1500, 1560)
    assert fp16["power_w_median"] == 695.0 and fp16["power_limit_w"] == 700.0
    assert fp16["power_capped_fraction"] == round(2 / 3, 3)  # bit 0x4 set in 2 of its 3 busy samples
    assert bf16["busy_samples"] == 2 and bf16["sm_mhz_median"] == 1620 and bf16["power_capped_fraction"] == 1.0
    assert summary["dtypes"]["fp16"]["sm_mhz_median"] == 1540
    assert summary["bf16_over_fp16_sm_mhz"] == round(1620 / 1540, 4)
    stricter = gpu_clocks.summarise(gpu_clocks.read_samples(files[0]), gpu_clocks.read_segments(files[1]), 0.99)
    assert stricter["rows"][0]["busy_samples"] == 2  # 695 and 697 W ≥ 693 W; 690 W is not


def test_without_the_reasons_column_the_power_cap_fraction_is_unknown(tmp_path, files):
    smi = tmp_path / "old.csv"
    smi.write_text("\n".join(line.rsplit(",", 1)[0] for line in files[0].read_text().splitlines()) + "\n")
    summary = gpu_clocks.summarise(gpu_clocks.read_samples(smi), gpu_clocks.read_segments(files[1]))
    assert summary["rows"][0]["power_capped_fraction"] is None and summary["rows"][0]["busy_samples"] == 3


def test_the_committed_h200_summary_is_recomputed_from_its_raw_files():
    report = read_json(RESULTS_DIR / "04_gpu_clocks_h200.json")
    summary = gpu_clocks.summarise(gpu_clocks.read_samples(RESULTS_DIR / report["smi_file"]),
                                   gpu_clocks.read_segments(RESULTS_DIR / report["marks_file"]),
                                   report["busy_fraction_of_power_limit"])
    assert summary == {key: report[key] for key in summary}
    assert report["sampled_on"] == "NVIDIA H200" and report["command"].startswith("tools/gpu_clocks.py")
    # what the README says of it: bf16's median clock above fp16's at the same power, both at the cap
    assert summary["bf16_over_fp16_sm_mhz"] > 1.03
    dtypes = summary["dtypes"]
    assert abs(dtypes["fp16"]["power_w_median"] - dtypes["bf16"]["power_w_median"]) < 5
    assert min(d["power_capped_fraction"] for d in dtypes.values()) > 0.9


@pytest.mark.parametrize("read, text, message", [
    (gpu_clocks.read_samples, "timestamp, clocks.current.sm [MHz]\n", "line 1: no column"),
    (gpu_clocks.read_samples, HEADER + "\n" + _sample(1.0, 1500, 690.0) + "\nnot, a, sample\n", "line 3: not a sample"),
    (gpu_clocks.read_samples, "", "empty"),
    (gpu_clocks.read_segments, "BEGIN a 2026/12/05 02:00:01.000\n", "has no END"),
    (gpu_clocks.read_segments, "BEGIN a 2026/12/05 02:00:01.000\nBEGIN b 2026/12/05 02:00:02.000\n",
     "line 2: BEGIN b before END a"),
    (gpu_clocks.read_segments, "END a 2026/12/05 02:00:01.000\n", "line 1: END a without its BEGIN"),
    (gpu_clocks.read_segments, "BEGIN a 02:00:01\n", "line 1: expected"),
    (gpu_clocks.read_segments, "BEGIN a 2026-12-05 02:00:01\n", "line 1: the time"),
    (gpu_clocks.read_segments, "nothing here\n", "no BEGIN/END pair"),
], ids=["samples-no-column", "samples-bad-line", "samples-empty", "marks-no-end", "marks-begin-twice",
        "marks-end-alone", "marks-short-line", "marks-bad-time", "marks-none"])
def test_a_bad_samples_or_marks_file_names_its_line(tmp_path, read, text, message):
    path = tmp_path / "input.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read(path)


def test_a_row_without_samples_or_without_load_says_why(files, tmp_path):
    samples = gpu_clocks.read_samples(files[0])
    late = tmp_path / "late.txt"
    late.write_text(_marks(("x_fp16", 30.0, 40.0, "1")))
    with pytest.raises(ValueError, match="one clock"):
        gpu_clocks.summarise(samples, gpu_clocks.read_segments(late))
    idle = tmp_path / "idle.txt"
    idle.write_text(_marks(("x_fp16", 0.5, 1.5, "1")))
    with pytest.raises(ValueError, match="did the row fail"):
        gpu_clocks.summarise(samples, gpu_clocks.read_segments(idle))


def test_the_command_line_writes_the_summary_with_its_provenance(files, tmp_path):
    out = tmp_path / "clocks.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_clocks.py"), str(files[0]), str(files[1]),
                           "--device", "NVIDIA H200", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "median SM clock, bf16 / fp16: 1.0519" in done.stdout
    report = read_json(out)
    assert report["sampled_on"] == "NVIDIA H200" and report["commit"] and "gpu_clocks.py" in report["command"]
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_clocks.py"), str(files[0]),
                          str(tmp_path / "missing.txt"), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.txt: no such file" in bad.stderr
