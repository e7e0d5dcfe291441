"""The life of a run folder: what it holds, the lock of the training writing it, a finished run kept aside.

Nothing a run wrote is ever deleted. A finished run (``04_config.json`` + ``04_adapter/``) that a new run would
overwrite moves to ``previous/<UTC date of its config>/``; checkpoints of an unfinished run are resumed or the
run stops and says how to go on (``utils.training.settings``). ``04_training.lock`` (pid, host, start time)
keeps a second training out of a folder that one is writing; a lock whose process is gone is taken over.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from utils.files import read_json, save_json
from utils.paths import ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE
from utils.training.errors import TrainingConfigError, TrainingOutputError

LOCK_FILE = "04_training.lock"
PREVIOUS_DIR = "previous"
RUN_PREFIX = "04_"
# The runner's log of the kernel that is running notebook 04 now (``utils.runner``): it belongs to this run, not to
# the finished one being moved away, and moving it lost the current run's log
KERNEL_LOG = "04_kernel.log"
# errno values that mean "this folder cannot take the outputs", each with its fix.
OUTPUT_ERRNOS = {
    errno.EACCES: "make the folder writable, or set output_dir to a folder you can write",
    errno.EPERM: "make the folder writable, or set output_dir to a folder you can write",
    errno.EROFS: "set output_dir to a folder on a writable disk",
    errno.ENOSPC: "free space on that disk or set output_dir on another one",
    errno.EFBIG: "free space on that disk (or raise the file-size limit) or set output_dir on another one",
    errno.EDQUOT: "free space within your quota or set output_dir on another disk",
}

# --------------------------------------------------------------------------------------------
# What a run folder holds
# --------------------------------------------------------------------------------------------


def is_finished_run(out: str | Path) -> bool:
    """Whether ``out`` holds a finished run: its config and a saved adapter."""
    out = Path(out)
    return (out / CONFIG_FILE).is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Every ``checkpoint-*`` folder of the run (complete or cut off by a crash), oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    return sorted(folder.glob("checkpoint-*"), key=lambda p: (len(p.name), p.name)) if folder.is_dir() else []


def run_outputs(out: str | Path) -> list[Path]:
    """The files and folders of the run in ``out`` (``04_*``), without the lock, the executed notebook and the kernel
    log: the runner writes those two for the run now starting."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob(f"{RUN_PREFIX}*")
                  if p.name not in (LOCK_FILE, KERNEL_LOG) and p.suffix != ".ipynb")


def previous_run_dir(out: str | Path) -> Path:
    """``previous/<UTC date of the finished run's config>/`` (``-2``, ``-3``... if that name is taken)."""
    out = Path(out)
    try:
        stamp = dt.datetime.fromisoformat(read_json(out / CONFIG_FILE)["date"])
    except (OSError, ValueError, KeyError, TypeError):
        stamp = dt.datetime.fromtimestamp((out / CONFIG_FILE).stat().st_mtime, dt.timezone.utc)
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(dt.timezone.utc)
    name = stamp.strftime("%Y%m%dT%H%M%SZ")
    target, n = out / PREVIOUS_DIR / name, 1
    while target.exists():
        n += 1
        target = out / PREVIOUS_DIR / f"{name}-{n}"
    return target


def move_finished_run(out: str | Path) -> Path:
    """Move the finished run's ``04_*`` outputs to ``previous/<date>/`` (a rename: nothing is copied or lost)."""
    out = Path(out)
    target = previous_run_dir(out)
    target.mkdir(parents=True)
    for path in run_outputs(out):
        shutil.move(str(path), str(target / path.name))
    return target


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


def read_lock(out: str | Path) -> dict[str, Any] | None:
    """The lock's record (pid, host, started_at), ``{}`` when unreadable, None without a lock."""
    path = Path(out) / LOCK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def lock_holder(out: str | Path) -> dict[str, Any] | None:
    """The record of a live lock held by *another* process, or None (no lock, a stale one, or ours)."""
    record = read_lock(out)
    if not record:
        return None
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and pid == os.getpid():
        return None
    if host != socket.gethostname():
        return record  # its process cannot be checked from here
    return record if isinstance(pid, int) and pid_alive(pid) else None


def check_not_locked(out: str | Path) -> None:
    """One error when another live training is writing to ``out``."""
    holder = lock_holder(out)
    if holder is None:
        return
    path = Path(out) / LOCK_FILE
    raise TrainingConfigError(
        f"another training is writing to {out} (pid {holder.get('pid')} on {holder.get('host')}, started "
        f"{holder.get('started_at')}; lock {path}). Wait for it to finish, or set another output_dir. If that "
        f"process is gone (e.g. on another host), delete {path}."
    )


def acquire_lock(out: str | Path) -> Path:
    """Take ``04_training.lock`` for this process; a stale lock (its pid gone) is taken over with a warning."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        check_not_locked(out)
        old = read_lock(out) or {}
        if old.get("pid") != os.getpid():
            print(f"warning: taking over the stale lock {path} (pid {old.get('pid')} on {old.get('host')}, "
                  f"started {old.get('started_at')}, is no longer running)", file=sys.stderr)
        save_json(record, path)
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    if (read_lock(out) or {}).get("pid") != os.getpid():  # two takeovers at once: the last writer wins
        check_not_locked(out)
    return path


def release_lock(out: str | Path) -> None:
    """Remove the lock if this process holds it (never another process's)."""
    record = read_lock(out)
    if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        (Path(out) / LOCK_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# A folder that cannot take the outputs
# --------------------------------------------------------------------------------------------


def check_writable(out: str | Path) -> None:
    """One error when ``out`` (or the folder it would be created in) cannot be written."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingOutputError(f"output_dir={str(out)!r}: {existing} is a file, not a folder. "
                                  "Set output_dir to a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingOutputError(
            f"cannot write the training outputs to {out}: {existing} is not writable (permission denied). "
            f"{OUTPUT_ERRNOS[errno.EACCES].capitalize()}."
        )


def output_error_message(out: str | Path, error: BaseException) -> str | None:
    """One line for an error that means the folder cannot take the outputs, or None for any other error."""
    number = getattr(error, "errno", None)
    text = str(error)
    if number not in OUTPUT_ERRNOS and ("No space left on device" in text or "file write failed" in text):
        number = errno.ENOSPC  # torch.save and safetensors report a full disk as a RuntimeError
    if number not in OUTPUT_ERRNOS:
        return None
    where = getattr(error, "filename", None) or out
    return (f"cannot write the training outputs to {out}: {os.strerror(number).lower()} ({where}). "
            f"{OUTPUT_ERRNOS[number].capitalize()}; the checkpoints written so far are kept "
            f"(resume='auto' continues from the last complete one).")


@contextmanager
def output_errors(out: str | Path) -> Iterator[None]:
    """Turn a permission, read-only or disk-full error while writing the run into one ``TrainingOutputError``."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, TrainingOutputError):
            raise
        message = output_error_message(out, error)
        if message is None:
            raise
        raise TrainingOutputError(message) from None
