"""Small things every module needs: the project's errors, where data lives, device choice, safe writes."""

import errno
import fcntl
import glob
import json
import os
import re
import reprlib
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from numbers import Integral
from pathlib import Path

import psutil
import torch
from pydantic import ConfigDict, ValidationError
from safetensors import SafetensorError


class AbcgptError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


class Interrupted(AbcgptError):
    """Ctrl-C (or SIGTERM), with what was kept and how to go on: the CLI exits 130 (143)."""


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


class CoreShare:
    """Torch's CPU threads, fitted to the cores other processes leave idle. On a machine whose cores are all in use,
    two threads that wait for each other at every operation spend most of their time waiting for the one that
    shares its core (10x slower beside one busy process on 2 cores); one thread fewer is then faster. fit() reads
    how busy the machine was since the last call (psutil) and sets the threads: at most `most` (torch's default,
    one per core), at least one."""

    def __init__(self, most: int | None = None):
        self.most = most or torch.get_num_threads()
        self.process = psutil.Process()
        psutil.cpu_percent(None), self.process.cpu_percent(None)  # start both counters now
        self.since = time.monotonic()

    def fit(self) -> int:
        time.sleep(max(0.0, self.since + 0.05 - time.monotonic()))  # a shorter interval reads as idle
        self.since = time.monotonic()
        cores = psutil.cpu_count() or 1
        others = psutil.cpu_percent(None) / 100 * cores - self.process.cpu_percent(None) / 100
        n = max(1, min(self.most, round(cores - max(0.0, others))))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n


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


def not_a_file(path: Path) -> str:
    """What path is, for an error message, when it is not the regular file or folder wanted: a FIFO, a device,
    a socket, a folder, or that it does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "does not exist"
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")]
    return next((f"is {what}" for test, what in kinds if test(mode)), "is not a regular file")


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


# What atomic_dir wrote into a folder: {"kind": ..., "files": [...]}. Only a folder whose every file such a mark
# lists, of the same kind, is ever replaced: an earlier output of the same command, never a user's folder.
OUTPUT_MARK = ".abcgpt-output"


def check_output(final: Path, kind: str, legacy: Callable[[Path], set[str] | None] | None = None) -> Path:
    """Refuse, before any work, to replace what this kind of output did not write: a run, a checkpoint, a data
    folder, the current folder or one that holds anything else. Missing or empty folders are fine, and so is this
    kind's own earlier output (its mark, or for outputs older than marks, `legacy(folder)` naming their files).
    Returns the absolute path."""
    final = Path(os.path.abspath(final))
    if final == Path.cwd() or final in Path.cwd().parents:
        raise AbcgptError(f"{final} is the current folder or holds it: abcgpt writes its {kind} into a folder of "
                          "its own, so name a new one")
    if final.is_symlink():
        raise AbcgptError(f"{final} is a link: abcgpt does not write through links (remove it, or choose another "
                          "path)")
    if not final.exists():
        return final
    if not final.is_dir():
        raise AbcgptError(f"{final} exists and is not a folder: not replacing it")
    present = {p.relative_to(final).as_posix() for p in final.rglob("*") if not p.is_dir() or p.is_symlink()}
    if not present:
        return final
    mark = _read_mark(final)
    other = None if mark is None else mark["kind"]
    made = set(mark["files"]) if other == kind else None
    if made is None and legacy is not None:
        made = legacy(final)
    if made is None:
        what = f"an abcgpt {other}" if other else "files abcgpt did not write there"
        raise AbcgptError(f"{final} holds {what}; abcgpt only replaces its own earlier {kind}: choose another "
                          "path, or move it away yourself")
    extra = sorted(present - made - {OUTPUT_MARK})
    if extra:
        raise AbcgptError(f"{final} holds {extra[0]}" + (f" and {len(extra) - 1} more file(s)" if extra[1:] else "")
                          + " that abcgpt did not write: not replacing it (choose another path, or move them away)")
    return final


def _same_folder(tmp: Path, made: os.stat_result) -> None:
    now = os.lstat(tmp)
    if not stat.S_ISDIR(now.st_mode) or (now.st_ino, now.st_dev) != (made.st_ino, made.st_dev):
        raise AbcgptError(f"{tmp} was replaced while abcgpt wrote it: not renaming it into place")


def _read_mark(folder: Path) -> dict | None:
    try:
        mark = json.loads((folder / OUTPUT_MARK).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(mark, dict) and isinstance(mark.get("kind"), str) and isinstance(mark.get("files"), list)
    return mark if ok and all(isinstance(f, str) for f in mark["files"]) else None


@contextmanager
def atomic_dir(final: Path, kind: str, legacy: Callable[[Path], set[str] | None] | None = None,
               lock: bool = True) -> Iterator[Path]:
    """Write a folder all or nothing: yields a new temporary folder beside final (a unique name) to fill; on success
    it is marked, flushed and swapped in place of final, on any failure (a full disk, Ctrl-C) it is removed and final
    is as it was. Only what check_output allows is replaced. lock: one writer at a time, others refused naming it
    (callers that already hold a run or folder lock pass False)."""
    final = check_output(final, kind, legacy)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(final, e) from None
    with output_lock(final, wait=False) if lock else nullcontext():
        if lock:
            check_output(final, kind, legacy)  # again, now that no other writer can change it
        for stale in final.parent.glob(f"{glob.escape(final.name)}.*.tmp"):  # left by a killed writer
            if re.fullmatch(re.escape(final.name) + r"\.[a-z0-9_]{8}\.tmp", stale.name) and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp"))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
            made = os.lstat(tmp)
            yield tmp
            _same_folder(tmp, made)  # what is marked and renamed into place is the folder written, nothing put there
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
            (tmp / OUTPUT_MARK).write_text(json.dumps({"kind": kind, "files": files}))
            fsync_dir(tmp)
            _same_folder(tmp, made)
            replace_dir(tmp, final)
        except BaseException as e:
            if tmp is not None and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError | SafetensorError):
                raise write_error(final, e) from None
            raise


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM inside waits for the block to end, then takes effect: a checkpoint is written whole or not
    at all, and the write itself is never cut (a KeyboardInterrupt inside a C extension's write can surface as
    another error). Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for s in dict.fromkeys(caught):
        if callable(previous[s]):
            previous[s](s, None)  # Python's SIGINT handler (or the CLI's SIGTERM one) raises KeyboardInterrupt
        elif previous[s] == signal.SIG_DFL:
            signal.raise_signal(s)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a file all or nothing: a uniquely named temporary beside it, renamed over it (a rename replaces a
    link at path rather than writing through it)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def open_append(path: Path):
    """A log file opened for appending, never through a link planted at its name."""
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644),
                         "a")
    except OSError as e:
        raise _link_error(path, e) from None


@contextmanager
def output_lock(folder: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on FOLDER.lock, beside a folder that may not exist yet, while one process writes the
    folder. wait: another writer waits for its turn (then finds the folder written); else it is refused, naming
    the process that holds the lock."""
    folder = Path(folder)
    with _locked(folder.with_name(folder.name + ".lock"), wait, f"{folder} is being written"):
        yield


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """An exclusive lock on a run folder while a process writes checkpoints into it: a second trainer (or a
    calibration) on the same folder is refused, naming the process that holds it. The kernel drops the lock when
    that process ends, however it ends."""
    with _locked(Path(run) / ".lock", False, f"{run} is in use"):
        yield


@contextmanager
def _locked(path: Path, wait: bool, busy: str) -> Iterator[None]:
    """flock on the lock file at path (its folder made if need be), which records the holder's PID. Opened without
    following links: a link planted there never gets written through."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _link_error(path, e) from None
    with os.fdopen(fd, "r+") as f:  # closing it drops the flock, which the kernel also does when the process ends
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AbcgptError(f"{path} is not a regular file: remove it (abcgpt keeps a lock there)")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = f.read().strip() or "unknown"
            raise AbcgptError(f"{busy} by another abcgpt process (PID {pid}): wait for it to end, or stop it") \
                from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def refuse_link(path: Path) -> None:
    """A file abcgpt reads and rewrites in place (a run's log) must not be a link to something elsewhere."""
    if Path(path).is_symlink():
        raise _link_error(path, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))


def _link_error(path: Path, e: OSError) -> AbcgptError:
    if e.errno == errno.ELOOP:
        return AbcgptError(f"{path} is a link: abcgpt does not write through links (remove it)")
    return write_error(path, e)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory tmp in place of final, so readers see the old or the new one, never half.
    A crash between the two renames leaves final.old, which load paths fall back to."""
    old = final.with_name(final.name + ".old")
    if final.exists():  # then any final.old is stale; without final, final.old is the only copy: keep it
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _remove(path: Path) -> None:
    """A folder, or a link planted in its place (the link goes, never what it points to)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def existing_dir(path: Path) -> Path:
    """path, or the path.old that a crash during replace_dir left behind."""
    if not Path(path).name:  # ".", "/": never an output of ours
        return path
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
