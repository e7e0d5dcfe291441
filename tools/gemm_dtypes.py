"""The fast path's GEMMs of one step, timed in fp16 and in bf16 on this GPU, with and without K padded.

The strict run (``results/04_speed_strict8.json``) found the fast path's step 3.3 % slower in fp16 than in bf16 at
micro-batch 32 on an H200, where Unsloth's was 1.9 % slower, and GEMMs take more than half of that step's GPU time
(``results/04_profile_h200_issue20.log``). fp16 is the only half precision of the thesis's RTX 2070 SUPER, so the
question matters beyond the benchmark: do cuBLAS's kernels for these shapes run slower in fp16, and does it depend
on K? The fused q/k/v and gate/up GEMMs read the LoRA update as extra columns of K (``[x | x·Aᵀ] @ [W | α·B]ᵀ``,
``utils.speed.fastpath.layers``), so their K is 3,072 + 96 and 3,072 + 64, not a multiple of 128; the ``padded``
variants round it up.

Each GEMM of one decoder layer (shapes from the model config and the thesis's LoRA rank) runs at ``--tokens`` rows
(a micro-batch's tokens) in each dtype under each BLAS library PyTorch can prefer on CUDA (cuBLAS, its default, and
cuBLASLt: their kernel choices may differ by dtype), all of them taking turns, ``--repeats`` times after a warm-up;
each time is the median. The per-step estimate weighs each GEMM by how often a step runs it with
checkpoint_keep="input": the forward GEMMs twice (forward and recomputation; down_proj's once, its recomputation is
skipped), the input-gradient GEMMs once, times the number of layers. The LoRA's own small GEMMs and everything else
are left out::

    .venv/bin/python tools/gemm_dtypes.py                            # CUDA: micro-batch 32 of Llama-3.2-3B
    .venv/bin/python tools/gemm_dtypes.py --tokens 20480 --out /tmp/g.json
    .venv/bin/python tools/gemm_dtypes.py --device cpu --tokens 64 --repeats 2 --out /tmp/g.json  # logic only

Writes ``results/04_gemm_dtypes_<gpu>.json`` (``--out`` elsewhere) with every time, the ratios and provenance.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from utils.config import THESIS  # noqa: E402
from utils.files import read_json, save_json  # noqa: E402
from utils.paths import RESULTS_DIR, TWIN_CONFIG_FILE  # noqa: E402
from utils.provenance import result_provenance  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PAD_TO = 128  # K rounded up to this many columns in the padded variants


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a decoder layer: ``(m × k) @ (k × n)``, how often a step runs it per layer, and how.

    ``kind``: "mm" (out = x @ wᵀ), "addmm" (out += x @ wᵀ, the frozen GEMM onto the LoRA part), "grad" (the
    input gradient, out += ``g @ w[:, :n]``, read through a view of rows ``k_stride`` wide, as the backward reads
    the fused weight).
    """

    name: str
    m: int
    n: int
    k: int
    kind: str
    per_layer: int
    k_stride: int = 0  # "grad": the row stride of the weight view (0: contiguous)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def layer_gemms(config: dict, tokens: int, r: int, padded: bool) -> list[Gemm]:
    """The frozen GEMMs of one decoder layer of ``config`` (a Llama config as a dict) at ``tokens`` rows."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    pad = (lambda k: round_up(k, PAD_TO)) if padded else (lambda k: k)
    k_qkv, k_gate_up = pad(hidden + 3 * r), pad(hidden + 2 * r)
    return [
        Gemm("q/k/v [x | xA]·[W | αB]ᵀ", tokens, qkv, k_qkv, "mm", 2),
        Gemm("gate/up [x | xA]·[W | αB]ᵀ", tokens, 2 * inter, k_gate_up, "mm", 2),
        Gemm("o_proj x·Wᵀ (addmm)", tokens, hidden, hidden, "addmm", 2),
        Gemm("down_proj x·Wᵀ (addmm)", tokens, hidden, inter, "addmm", 1),
        Gemm("q/k/v input gradient", tokens, hidden, qkv, "grad", 1, k_stride=k_qkv),
        Gemm("gate/up input gradient", tokens, hidden, 2 * inter, "grad", 1, k_stride=k_gate_up),
        Gemm("o_proj input gradient", tokens, hidden, hidden, "grad", 1),
        Gemm("down_proj input gradient", tokens, inter, hidden, "grad", 1),
    ]


def _operands(gemm: Gemm, dtype: torch.dtype, device: torch.device):
    """Random operands of ``gemm`` (scaled so that fp16 stays finite) and the call that runs it."""
    g = torch.Generator(device=device).manual_seed(0)
    scale = gemm.k ** -0.5

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = rand(gemm.m, gemm.k)
    if gemm.kind == "grad":  # g (m × k) @ w[:, :n], w's rows k_stride wide (the fused weight's view)
        stored = rand(gemm.k, gemm.k_stride or gemm.n)
        w = stored[:, :gemm.n]
        out = rand(gemm.m, gemm.n)  # the LoRA part of the input gradient, onto which the frozen GEMM adds itself
        return lambda: out.addmm_(x, w)
    w = rand(gemm.n, gemm.k)
    if gemm.kind == "addmm":
        out = rand(gemm.m, gemm.n)
        return lambda: out.addmm_(x, w.t(), beta=0.5)
    return lambda: x @ w.t()


def _timer(device: torch.device):
    """``time(fn)`` → seconds of one call: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        def cuda_time(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return cuda_time

    def wall_time(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return wall_time


def blas_libraries(device: torch.device) -> tuple[str, ...]:
    """The BLAS libraries PyTorch can be told to prefer here (``torch.backends.cuda.preferred_blas_library``)."""
    return ("cublas", "cublaslt") if device.type == "cuda" else ("default",)


def _distinct_shapes(config: dict, tokens: int, r: int) -> list[tuple[bool, Gemm]]:
    """Every GEMM plain, then padded where padding changed it (K already a multiple of PAD_TO: timed once)."""
    seen, todo = set(), []
    for padded in (False, True):
        for gemm in layer_gemms(config, tokens, r, padded):
            key = (gemm.m, gemm.n, gemm.k, gemm.kind, gemm.k_stride)
            if key not in seen:
                seen.add(key)
                todo.append((padded, gemm))
    return todo


def measure(config: dict, tokens: int, r: int, device: torch.device, repeats: int, warmup: int) -> list[dict]:
    """Median seconds of every GEMM in each dtype and BLAS library, plain and padded; within each repeat the
    libraries and dtypes take turns, so that a drift of the GPU's clock touches them alike."""
    timer = _timer(device)
    libraries = blas_libraries(device)
    prefer = torch.backends.cuda.preferred_blas_library if device.type == "cuda" else (lambda backend=None: None)
    before = prefer()
    rows = []
    try:
        for padded, gemm in tqdm(_distinct_shapes(config, tokens, r), desc="GEMMs", unit="shape"):
            calls = {name: _operands(gemm, dtype, device) for name, dtype in DTYPES.items()}
            times = {(blas, name): [] for blas in libraries for name in DTYPES}
            for round_ in range(warmup + repeats):
                for blas in libraries:
                    prefer(blas if blas != "default" else None)
                    for name, call in calls.items():
                        seconds = timer(call)
                        if round_ >= warmup:
                            times[blas, name].append(seconds)
            for blas in libraries:
                row = {**asdict(gemm), "padded": padded, "blas": blas, "flops": 2 * gemm.m * gemm.n * gemm.k}
                for name in DTYPES:
                    seconds = statistics.median(times[blas, name])
                    row[f"{name}_ms"] = round(seconds * 1000, 4)
                    row[f"{name}_tflops"] = round(row["flops"] / seconds / 1e12, 1)
                row["fp16_over_bf16"] = round(row["fp16_ms"] / row["bf16_ms"], 4)
                rows.append(row)
            del calls
    finally:
        if before is not None:
            prefer(before)
    return rows


def step_estimate(rows: list[dict], layers: int) -> dict:
    """GEMM milliseconds per optimizer step, per BLAS library and dtype, K plain and padded (padded: the padded
    GEMMs where padding changed K, the plain ones elsewhere)."""
    out = {}
    for blas in dict.fromkeys(row["blas"] for row in rows):
        mine = [row for row in rows if row["blas"] == blas]
        estimate = {}
        for padded in (False, True):
            chosen = {row["name"]: row for row in mine if not row["padded"]}
            if padded:
                chosen.update({row["name"]: row for row in mine if row["padded"]})
            for name in DTYPES:
                key = f"{'padded' if padded else 'plain'}_{name}_ms"
                estimate[key] = round(layers * sum(r[f"{name}_ms"] * r["per_layer"] for r in chosen.values()), 2)
        for variant in ("plain", "padded"):
            ratio = estimate[f"{variant}_fp16_ms"] / estimate[f"{variant}_bf16_ms"]
            estimate[f"{variant}_fp16_over_bf16"] = round(ratio, 4)
        out[blas] = estimate
    return out


def default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return RESULTS_DIR / f"04_gemm_dtypes_{slug}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32 * THESIS.max_seq_length,
                        help="rows of every GEMM: a micro-batch's tokens (default 32 × 512)")
    parser.add_argument("--config", type=Path, default=TWIN_CONFIG_FILE,
                        help="a Llama config.json (default: Llama-3.2-3B's, utils/assets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default results/04_gemm_dtypes_<gpu>.json)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens and --repeats must be 1 or more, --warmup 0 or more")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file (give a Llama config.json)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (--device cpu times the logic only)")
    config = read_json(args.config)
    rows = measure(config, args.tokens, THESIS.lora_r, device, args.repeats, args.warmup)
    report = {
        "label": "GEMMs of one fast-path decoder layer in fp16 and bf16, under each BLAS library PyTorch can "
                 f"prefer, K plain and padded to a multiple of {PAD_TO}; median of {args.repeats} interleaved "
                 "repeats (CUDA events on a GPU)",
        **result_provenance(),
        "config": str(args.config.name), "tokens": args.tokens, "lora_r": THESIS.lora_r,
        "layers": config["num_hidden_layers"], "rows": rows,
        "step_estimate": step_estimate(rows, config["num_hidden_layers"]),
    }
    out = save_json(report, args.out or default_out(device))
    for row in rows:
        shape = f"{row['m']:>6}×{row['k']:>5}→{row['n']:>6}"
        print(f"{row['name']:<34} {'pad' if row['padded'] else '   '} {row['blas']:<8} {shape}  "
              f"fp16 {row['fp16_ms']:8.3f} ms ({row['fp16_tflops']:6.1f} TFLOP/s)  bf16 {row['bf16_ms']:8.3f} ms "
              f"({row['bf16_tflops']:6.1f})  fp16/bf16 {row['fp16_over_bf16']:.3f}")
    print(json.dumps(report["step_estimate"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
