"""Small things every module needs: the project's errors, where data lives, device choice, safe writes."""

import errno
import fcntl
import os
import re
import reprlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path

import torch
from pydantic import ConfigDict, ValidationError
from safetensors import SafetensorError


class AbcgptError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


class Interrupted(AbcgptError):
    """Ctrl-C, with what was kept and how to go on: the CLI exits 130."""


# Recipe tables are pydantic dataclasses declared with this: JSON/TOML types as written (no "1" for 1, no true
# for 1), finite floats only, no unknown keys. Each key's range sits beside its default.
DECLARED = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
# Roles of keys that do not change what an ungated model learns from the data: the dial's own knobs, and how a
# run executes. A baseline may differ from the dial model in these and still be compared with it.
DIAL_KEY = {"role": "dial"}
RUN_KEY = {"role": "run"}


def validation_message(e: ValidationError, prefix: str = "") -> str:
    """pydantic's first complaint as one line: the key (after prefix: "train.", "--"), the value given and what
    is allowed."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    key = prefix + ".".join(loc)
    if err["type"] == "value_error":  # our own validators: their message says what is wrong with the value
        return f"{key}: {err['ctx']['error']}" if key else str(err["ctx"]["error"])
    if err["type"] == "missing":
        return f"{key} is missing"
    if err["type"] == "extra_forbidden":
        return f"{key} is not a known key"
    why = err["msg"][:1].lower() + err["msg"][1:]
    if loc and loc[-1] == "[key]":  # a key of a dict, like a file name
        return f"{prefix + '.'.join(loc[:-2])} has a key {loc[-2]!r}: {why}"
    return f"{key} = {reprlib.repr(err['input'])} is not allowed: {why}"


@contextmanager
def declared(prefix: str = "") -> Iterator[None]:
    """Creating DECLARED dataclasses inside: a ValidationError becomes an AbcgptError (validation_message)."""
    try:
        yield
    except ValidationError as e:
        raise AbcgptError(validation_message(e, prefix)) from None


def check_integer(name: str, value: object, low: int, high: int | None = None) -> None:
    """An integer in [low, high] (no bool, no float), or an AbcgptError naming it and what is allowed."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise AbcgptError(f"{name} must be {allowed}, got {value!r}")


def data_dir() -> Path | None:
    """The local corpus directory ($ABCGPT_DATA_DIR), laid out like shared/data: <name>/<files>."""
    d = os.environ.get("ABCGPT_DATA_DIR")
    return Path(d).expanduser() if d else None


def cache_dir() -> Path:
    """Where downloaded corpora are kept ($ABCGPT_CACHE_DIR, default ~/.cache/abcgpt)."""
    d = os.environ.get("ABCGPT_CACHE_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "abcgpt"


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def pick_device(name: str = "auto") -> torch.device:
    """auto (CUDA, else MPS, else CPU), cpu, mps, cuda or cuda:N; one that this machine lacks is an error."""
    if not isinstance(name, str) or not DEVICE.fullmatch(name):
        raise AbcgptError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise AbcgptError(f"device {name} is not available: {why} (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise AbcgptError(f"device {name} is not available: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AbcgptError("device mps is not available on this machine (use cpu or auto)")
    return device


def write_error(path: Path, e: Exception) -> AbcgptError:
    """A failed write as one line naming the path: a full disk, a read-only folder, a missing parent."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    if isinstance(e, SafetensorError) and ("StorageFull" in str(e) or "os error 28" in str(e)):
        why = os.strerror(errno.ENOSPC)
    return AbcgptError(f"cannot write {path}: {why}")


def check_writable(path: Path) -> Path:
    """Fail before the work, not after it: the folder path (or, if it is not there yet, the nearest folder above
    it, which will hold it) must take new files. Returns path."""
    path = Path(path)
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AbcgptError(f"cannot write {path}: {folder} is not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise write_error(folder, e) from None
    return path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a folder all or nothing: yields final.tmp to fill; on success it is flushed and swapped in place of
    final, on any failure (a full disk, Ctrl-C) it is removed and final is as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):
            raise write_error(final, e) from None
        raise


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside waits for the block to end, then is raised: a checkpoint is written whole or not at all, and
    the write itself is never cut (a KeyboardInterrupt inside a C extension's write can surface as another error).
    Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file all or nothing (a temporary beside it, renamed over it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on FOLDER.lock, beside a folder that may not exist yet, while one process writes the
    folder: another that wants to write it waits for its turn (then finds the folder written)."""
    folder = Path(folder)
    with _lock_file(folder.with_name(folder.name + ".lock")) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """An exclusive lock on a run folder while a process writes checkpoints into it: a second trainer (or a
    calibration) on the same folder is refused, naming the process that holds it. The kernel drops the lock when
    that process ends, however it ends."""
    run = Path(run)
    with _lock_file(run / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise AbcgptError(f"{run} is in use by another abcgpt process (PID {pid}): wait for it to end, or "
                              "stop it") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _lock_file(path: Path):
    """The lock file at path, open for reading and appending (its folder made if need be); closing it drops any
    flock taken on it, which the kernel also does when the process ends, however it ends."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as e:
        raise write_error(path, e) from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory tmp in place of final, so readers see the old or the new one, never half.
    A crash between the two renames leaves final.old, which load paths fall back to."""
    old = final.with_name(final.name + ".old")
    if final.exists():  # then any final.old is stale; without final, final.old is the only copy: keep it
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def existing_dir(path: Path) -> Path:
    """path, or the path.old that a crash during replace_dir left behind."""
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def fsync_dir(path: Path) -> None:
    """Flush every file written into path (and path itself) to disk before it is renamed into place."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
