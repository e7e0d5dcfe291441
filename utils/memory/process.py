"""Memory of this process on a CPU: resident set (``VmRSS``), its high-water mark (``VmHWM``), freed heap pages.

The resident set is split into anonymous memory (heap, tensors) and file-backed pages (safetensors are
memory-mapped, so fp32 weights loaded without conversion stay file-backed).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from pathlib import Path

import psutil
import torch


def _proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory fields in bytes (empty off Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process: ``rss``, ``anon`` (heap, tensors) and ``file`` (mapped files)."""
    status = _proc_status()
    if "VmRSS" in status:
        return {"rss": status["VmRSS"], "anon": status.get("RssAnon", 0), "file": status.get("RssFile", 0)}
    rss = psutil.Process().memory_info().rss
    return {"rss": rss, "anon": rss, "file": 0}


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux ``clear_refs``); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident high-water mark since the last ``reset_peak_rss`` (or since the process started)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows: the peak working set
        return int(info.peak_wset)
    import resource  # Unix only (absent on Windows, handled above): macOS and the BSDs

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``), so RSS counts live data only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then also holds freed-but-kept heap pages
        pass


def touch_parameters(model) -> None:
    """Read every parameter once, so memory-mapped weights become resident before RSS is read."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.numel():
                param.detach().view(-1)[:: 1024].sum()  # one element per 4 KiB page of fp32
