"""Small things every module needs: the project's error type, where data lives, device choice."""

import os
import shutil
from pathlib import Path

import torch


class AbcgptError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


def data_dir() -> Path | None:
    """The local corpus directory ($ABCGPT_DATA_DIR), laid out like shared/data: <name>/<files>."""
    d = os.environ.get("ABCGPT_DATA_DIR")
    return Path(d).expanduser() if d else None


def cache_dir() -> Path:
    """Where downloaded corpora are kept ($ABCGPT_CACHE_DIR, default ~/.cache/abcgpt)."""
    d = os.environ.get("ABCGPT_CACHE_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "abcgpt"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


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
