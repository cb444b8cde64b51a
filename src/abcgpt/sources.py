"""Text sources: built-in corpora, local files and folders, URLs and Hugging Face datasets.

Every source comes out as a SourceText: training text plus held-out text that never overlaps it, with a sha256
of the bytes read so that prepared data can notice when its input changed. Built-in files are looked up in
$ABCGPT_DATA_DIR/<folder>/<file>, then in the cache, then downloaded into the cache: from
$ABCGPT_MIRROR/<folder>/<file> when a mirror is set, else from the official URL. The folder is the source's name,
or voices/<name> for the voices corpora (VOICES).
"""

import difflib
import hashlib
import http.client
import math
import os
import re
import tempfile
import typing
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from abcgpt.common import AbcgptError, cache_dir, data_dir, not_a_file

TIMEOUT = 30  # seconds without data before a download gives up
NORMALIZE = ("none", "reference")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
RESERVED_NAMES = (".", "..", "uniform")  # path parts, and the dial's word for the even mix


def check_source_name(name) -> None:
    """Source names become file names (shards, baseline runs) and words of the dial syntax (name=w,...): an
    identifier, so that no name can leave its folder or be read as another dial (a number is a dial position)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED_NAMES or _is_number(name):
        raise AbcgptError(f"source name {name!r} is not allowed: use letters, digits, '_', '.' and '-', not only "
                          f"a number, and not {', '.join(repr(n) for n in RESERVED_NAMES)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class BuiltinSource:
    file: str  # training file, <data dir>/<folder>/<file>
    url: str | None  # official download URL; None: local data dir (or a mirror) only
    heldout_file: str | None = None  # official held-out file; None: the last fraction of the training text
    heldout_url: str | None = None
    about: str = ""
    folder: str | None = None  # the file's folder under the data dir, the cache and a mirror; None: the name


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    "shakespeare": BuiltinSource(
        "input.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        about="tiny Shakespeare (1.1 MB, karpathy/char-rnn)"),
    "tinystories": BuiltinSource(
        "train.txt", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-train.txt",
        "valid.txt", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
        about="TinyStories V1 (official train and validation files)"),
    "kjv": BuiltinSource("kjv.txt", None, about="King James Bible, one verse per line"),
    "python": BuiltinSource("cpython311_stdlib.txt", None, about="CPython 3.11 standard library source"),
}

# The voices: 28 corpora of 0.3-1.2 MB built from Debian 12 packages by shared/data/voices/build.sh (provenance,
# licences and cleaning in voices/SOURCES.md). No official URL: read from $ABCGPT_DATA_DIR/voices/<name>/text.txt
# (or the cache, or $ABCGPT_MIRROR/voices/<name>/text.txt); held-out text is the last data.heldout_fraction.
VOICES: dict[str, str] = {
    "bash_completion": "Bash completion functions (shell script)",
    "bible_kjv": "King James Bible, 15 whole books, one verse per line",
    "c_headers": "GNU C Library headers: declarations, macros, comments",
    "debian_changelogs": "Debian changelog entries of 63 packages",
    "debian_policy": "Debian Policy Manual: normative must/should prose",
    "devils_dictionary": "Ambrose Bierce, The Devil's Dictionary (1881-1906)",
    "dict_gcide": "Webster's Revised Unabridged (1913) via GCIDE",
    "foldoc": "Free On-line Dictionary of Computing (1 in 5 entries)",
    "fortunes_de": "German fortune cookies: Zitate, Sprüche, Gedichte, Witze",
    "fortunes_en": "classic English fortune cookies: quotations, jokes, poems",
    "fortunes_es": "Spanish fortune cookies: refranes, citas, humor",
    "fortunes_it": "Italian fortune cookies: battute, citazioni, leggi di Murphy",
    "fortunes_pl": "Polish fortune cookies: dowcipy, quotes, IRC logs",
    "fortunes_pt": "Brazilian Portuguese fortunes: piadas, citações",
    "fortunes_ru": "Russian fortune cookies: aphorisms, anekdoty, quotes",
    "fortunes_zh": "Chinese: Tang/Song poems, proverbs, Dao De Jing",
    "gnu_standards": "GNU Coding Standards and Information for GNU Maintainers",
    "jargon_file": "The Jargon File 4.4.7",
    "man_de": "German manual pages (manpages-l10n)",
    "man_en": "English Linux manual pages: system calls and C library",
    "man_es": "Spanish manual pages (manpages-l10n)",
    "man_fr": "French manual pages (manpages-l10n)",
    "man_ja": "Japanese manual pages (JM project)",
    "man_ru": "Russian manual pages (manpages-l10n)",
    "perl_modules": "Perl core modules, POD stripped",
    "python_docs": "Python 3.11 documentation as plain text",
    "python_stdlib": "Python 3.11 standard-library source code",
    "wordnet_glosses": "WordNet 3.0 synsets: lemmas, glosses, examples",
}
BUILTIN_SOURCES.update({name: BuiltinSource("text.txt", None, about=about, folder=f"voices/{name}")
                        for name, about in VOICES.items()})


@dataclass
class SourceSpec:
    name: str
    path: str | None = None  # local text file, or folder of .txt files (recursive, sorted, joined with "\n")
    url: str | None = None  # http(s) URL of a text file
    hf: str | None = None  # Hugging Face dataset (optional extra `datasets`), e.g. "roneneldan/TinyStories"
    hf_config: str | None = None
    hf_data_files: str | dict | None = None  # passed as data_files, e.g. hf="json" with local .jsonl files
    split: str = "train"  # HF split for training text
    heldout_split: str | None = None  # HF split for held-out text; None -> last fraction of the training text
    text_field: str = "text"
    heldout_path: str | None = None  # explicit held-out file or folder
    heldout_url: str | None = None
    max_bytes: int | None = None  # keep only the first N bytes of training text (URLs: an HTTP Range request)
    normalize: str = "none"  # "none" | "reference" (see normalize_reference)
    weight: float = 1.0  # how often the source is drawn relative to the others (> 0)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, hint = getattr(self, f.name), hints[f.name]
            types = tuple(typing.get_origin(t) or t for t in typing.get_args(hint) or (hint,))
            types += (int,) if float in types else ()  # weight = 2 is fine
            if isinstance(v, bool) or not isinstance(v, types):
                want = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise AbcgptError(f"source {self.name!r}: {f.name} must be {want}, got {v!r}")
        self.weight = float(self.weight)
        check_source_name(self.name)
        given = [k for k in ("path", "url", "hf") if getattr(self, k) is not None]
        if len(given) > 1:
            raise AbcgptError(f"source {self.name!r}: give at most one of path, url, hf "
                              f"(got {' and '.join(given)})")
        if not given and self.name not in BUILTIN_SOURCES:
            raise AbcgptError(unknown_builtin(self.name))
        hf_keys = ("hf_config", "hf_data_files", "split", "heldout_split", "text_field")
        hf_only = [f.name for f in fields(self) if f.name in hf_keys and getattr(self, f.name) != f.default]
        if self.hf is None and hf_only:
            raise AbcgptError(f"source {self.name!r}: {', '.join(hf_only)} only apply to hf sources")
        held = [k for k in ("heldout_path", "heldout_url", "heldout_split") if getattr(self, k) is not None]
        if len(held) > 1:
            raise AbcgptError(f"source {self.name!r}: give at most one of {' and '.join(held)}")
        for k in ("url", "heldout_url"):
            u = getattr(self, k)
            try:
                scheme = urllib.parse.urlparse(u).scheme if u is not None else "http"
            except ValueError:  # e.g. a malformed IPv6 host
                scheme = None
            if scheme not in ("http", "https"):
                raise AbcgptError(f"source {self.name!r}: {k} must be an http(s) URL, got {u!r}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise AbcgptError(f"source {self.name!r}: max_bytes must be a positive number of bytes, "
                              f"got {self.max_bytes}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise AbcgptError(f"source {self.name!r}: weight must be a number > 0, got {self.weight}")
        if self.normalize not in NORMALIZE:
            raise AbcgptError(f"source {self.name!r}: normalize must be one of {', '.join(NORMALIZE)}, "
                              f"got {self.normalize!r}")

    @classmethod
    def from_dict(cls, d: dict | str) -> "SourceSpec":
        """A spec from a recipe table; a bare string is the name of a built-in."""
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, dict):
            raise AbcgptError(f"a source must be a table or a built-in name, got {d!r}")
        allowed = [f.name for f in fields(cls)]
        for k in d:
            if k not in allowed:
                raise AbcgptError(f"unknown key {k!r} in source {d.get('name')!r}; "
                                  f"allowed keys: {', '.join(allowed)}")
        if "name" not in d:
            raise AbcgptError(f"source {d} has no name")
        return cls(**d)

    def to_dict(self) -> dict:
        """The name and every field that differs from its default (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name == "name" or getattr(self, f.name) != f.default}


def unknown_builtin(name: str) -> str:
    """The error for a source with neither path, url nor hf whose name is no built-in: the closest names first,
    then every built-in (one line, even with the 32 of them)."""
    close = difflib.get_close_matches(name, BUILTIN_SOURCES, n=3, cutoff=0.6)
    guess = f" (did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?)" if close else ""
    voices = [n for n in BUILTIN_SOURCES if n in VOICES]
    others = [n for n in BUILTIN_SOURCES if n not in VOICES]
    return (f"unknown built-in source {name!r}{guess}: built-ins are {', '.join(others)}, and the "
            f"voices {', '.join(voices)} (`abcgpt sources` describes them); or give path, url or hf")


def builtin_location(name: str) -> str:
    """Where a built-in's training file would be read from now, without reading it: for `abcgpt sources`."""
    b = BUILTIN_SOURCES[name]
    rel = f"{b.folder or name}/{b.file}"
    d = data_dir()
    if d is not None and (d / rel).is_file():
        return "$ABCGPT_DATA_DIR"
    if (cache_dir() / rel).is_file():
        return "cache"
    if os.environ.get("ABCGPT_MIRROR"):
        return "mirror"
    return "download" if b.url else "not found"


@dataclass
class SourceText:
    name: str
    train: str = field(repr=False)  # training text, never overlaps heldout
    heldout: str = field(repr=False)
    origin: str  # where it came from, for people
    sha256: dict[str, str]  # of the raw bytes read: "train" and "heldout", or "all" when split by fraction


def normalize_reference(text: str) -> str:
    """The reference abcGPT's Shakespeare normalisation, which makes it look like TinyStories: lower-case,
    spaces around . , ! ? ; : and runs of spaces/tabs collapsed to one space, but newlines kept (and no
    spaces left next to them), so the play keeps its line structure."""
    text = re.sub(r"([.,!?;:])", r" \1 ", text.lower())
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r" ?\n ?", "\n", text)


def load_source(spec: SourceSpec, heldout_fraction: float = 0.1, progress: bool = True) -> SourceText:
    """Read a source's training and held-out text. Without an explicit held-out file/split the held-out text
    is the last heldout_fraction of the training text (cut at a line start) and training text is the rest."""
    if not 0 < heldout_fraction <= 0.5:
        raise AbcgptError(f"heldout_fraction must be in (0, 0.5], got {heldout_fraction}")
    data, where = _read_train(spec, progress)
    held = _read_heldout(spec, progress)
    if spec.max_bytes is not None:
        where += f" (first {spec.max_bytes:,} bytes)"
    text = _text(data, where, spec.max_bytes)
    if held is None:
        train, heldout = _split_tail(text, heldout_fraction, where)
        origin = f"{where} (last {heldout_fraction * 100:g}% held out)"
        sha = {"all": hashlib.sha256(data).hexdigest()}
    else:
        train, heldout = text, _text(held[0], held[1], None)
        origin = f"{where}; held out: {held[1]}"
        sha = {"train": hashlib.sha256(data).hexdigest(), "heldout": hashlib.sha256(held[0]).hexdigest()}
    if spec.normalize == "reference":
        train, heldout = normalize_reference(train), normalize_reference(heldout)
    return SourceText(spec.name, train, heldout, origin, sha)


def _read_train(spec: SourceSpec, progress: bool) -> tuple[bytes, str]:
    if spec.path is not None:
        return _read_path(Path(spec.path).expanduser(), spec.max_bytes, spec.name)
    if spec.url is not None:
        return _fetch(spec.url, _url_cache(spec.url), spec.max_bytes, progress)
    if spec.hf is not None:
        return _read_hf(spec, spec.split, spec.max_bytes, progress)
    b = BUILTIN_SOURCES[spec.name]
    return _builtin_file(b.folder or spec.name, b.file, b.url, spec.max_bytes, progress, spec.name)


def _read_heldout(spec: SourceSpec, progress: bool) -> tuple[bytes, str] | None:
    if spec.heldout_path is not None:
        return _read_path(Path(spec.heldout_path).expanduser(), None, spec.name)
    if spec.heldout_url is not None:
        return _fetch(spec.heldout_url, _url_cache(spec.heldout_url), None, progress)
    if spec.heldout_split is not None:
        return _read_hf(spec, spec.heldout_split, None, progress)
    if spec.path is None and spec.url is None and spec.hf is None:
        b = BUILTIN_SOURCES[spec.name]
        if b.heldout_file:
            return _builtin_file(b.folder or spec.name, b.heldout_file, b.heldout_url, None, progress, spec.name)
    return None


def _utf8(data: bytes, where: str, max_bytes: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        cut = max_bytes is not None and len(data) >= max_bytes
        if cut and e.end == len(data) and e.reason == "unexpected end of data":
            return data[:e.start].decode("utf-8")  # cutting at max_bytes split the last character: drop it
        raise AbcgptError(f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"({e.reason})") from None


def _text(data: bytes, where: str, max_bytes: int | None) -> str:
    text = _utf8(data, where, max_bytes)
    if not text.strip():
        raise AbcgptError(f"{where} is empty")
    return text


def _split_tail(text: str, fraction: float, where: str) -> tuple[str, str]:
    """(train, heldout) = (text[:cut], text[cut:]) with heldout about the last `fraction` of the text."""
    cut = len(text) - max(1, int(len(text) * fraction))
    # move the cut to the nearest line start, so that no line is shared by train and held-out text
    starts = [text.rfind("\n", 0, cut) + 1, text.find("\n", cut) + 1]
    starts = [s for s in starts if 0 < s < len(text)]
    if starts:
        cut = min(starts, key=lambda s: abs(s - cut))
    train, heldout = text[:cut], text[cut:]
    if not train.strip() or not heldout.strip():
        raise AbcgptError(f"{where} is too short to hold out {fraction * 100:g}% ({len(text)} characters)")
    return train, heldout


# ----------------------------------------------------------------------------- local files


def _read_bytes(p: Path, max_bytes: int | None) -> bytes:
    """The file, or its first max_bytes, read in chunks: f.read(n) would reserve n bytes, whatever the file holds."""
    try:
        with open(p, "rb") as f:
            if max_bytes is None:
                return f.read()
            chunks, left = [], max_bytes
            while left > 0 and (chunk := f.read(min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
    except OSError as e:
        raise AbcgptError(f"cannot read {p}: {e.strerror}") from None


def _read_path(p: Path, max_bytes: int | None, name: str) -> tuple[bytes, str]:
    """A file, or a folder's .txt files (recursive, sorted by path, hidden ones skipped) joined with "\\n"."""
    if p.is_file():
        return _read_bytes(p, max_bytes), str(p)
    if not p.is_dir():
        why = not_a_file(p)
        raise AbcgptError(f"source {name!r}: no such file or folder: {p.absolute()}" if why == "does not exist" else
                          f"source {name!r}: {p.absolute()} {why}")
    files = sorted(f for f in p.rglob("*.txt") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise AbcgptError(f"source {name!r}: folder {p.absolute()} has no .txt files")
    parts, n = [], 0
    for f in files:
        rest = None if max_bytes is None else max_bytes - n
        data = _read_bytes(f, rest)
        _utf8(data, str(f), rest)  # so that a bad byte is reported with its own file and offset
        parts.append(data)
        n += len(data) + 1
        if max_bytes is not None and n >= max_bytes:
            break
    data = b"\n".join(parts)
    return data[:max_bytes], f"{p}/ ({len(parts)} .txt files)"


# ----------------------------------------------------------------------------- downloads


def _builtin_file(folder: str, file: str, url: str | None, max_bytes: int | None, progress: bool,
                  name: str) -> tuple[bytes, str]:
    """A built-in's file <folder>/<file>: from the data dir, the cache, a mirror or its URL."""
    d = data_dir()
    if d is not None and (d / folder / file).is_file():
        return _read_bytes(d / folder / file, max_bytes), f"$ABCGPT_DATA_DIR/{folder}/{file}"
    dest = cache_dir() / folder / file
    mirror = os.environ.get("ABCGPT_MIRROR")
    if mirror:
        url = f"{mirror.rstrip('/')}/{folder}/{file}"
    if url is None and _from_cache(dest, max_bytes) is None:
        looked = f"{d / folder / file} and {dest}" if d is not None else f"{dest} ($ABCGPT_DATA_DIR is not set)"
        raise AbcgptError(f"built-in source {name!r} has no download URL and {folder}/{file} was not found "
                          f"(looked in {looked}): set $ABCGPT_DATA_DIR to a folder that holds {folder}/{file}")
    return _fetch(url, dest, max_bytes, progress)


def _url_cache(url: str) -> Path:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "index"
    return cache_dir() / "url" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def _partial(dest: Path, max_bytes: int) -> Path:
    # a first-N-bytes download gets its own name so that it is never taken for the whole file
    return dest.with_name(f"{dest.stem}.first{max_bytes}bytes{dest.suffix}")


def _from_cache(dest: Path, max_bytes: int | None) -> tuple[bytes, Path] | None:
    if dest.is_file():
        return _read_bytes(dest, max_bytes), dest
    if max_bytes is not None and _partial(dest, max_bytes).is_file():
        return _read_bytes(_partial(dest, max_bytes), None), _partial(dest, max_bytes)
    return None


def _fetch(url: str, dest: Path, max_bytes: int | None, progress: bool) -> tuple[bytes, str]:
    """The first max_bytes (or all) of url, through the cache file dest."""
    hit = _from_cache(dest, max_bytes)
    if hit is not None:
        return hit[0], str(hit[1])
    if max_bytes is not None:
        dest = _partial(dest, max_bytes)
    _download(url, dest, max_bytes, progress)
    return _read_bytes(dest, None), f"{url} (saved to {dest})"


def _download(url: str, dest: Path, max_bytes: int | None, progress: bool) -> None:
    """Download url (its first max_bytes only, via a Range request) to dest, atomically."""
    req = urllib.request.Request(url, headers={"User-Agent": "abcgpt"})
    if max_bytes is not None:
        req.add_header("Range", f"bytes=0-{max_bytes - 1}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            span = r.headers.get("Content-Range", "")
            if r.status == 206 and not span.startswith("bytes 0-"):
                raise AbcgptError(f"download of {url} failed: unexpected Content-Range {span!r}")
            size = r.headers.get("Content-Length", "")
            want = int(size) if size.isdigit() else None
            if max_bytes is not None and r.status != 206 and want is not None:
                want = min(want, max_bytes)  # the server ignored Range: read only what we asked for
            n = 0
            with tqdm(total=want, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while max_bytes is None or n < max_bytes:
                    chunk = r.read(1 << 20 if max_bytes is None else min(1 << 20, max_bytes - n))
                    if not chunk:
                        break
                    f.write(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if want is not None and n < want:
                raise AbcgptError(f"download of {url} was cut off after {n:,} of {want:,} bytes")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise AbcgptError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise AbcgptError(f"download of {url} failed: {reason}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- Hugging Face


def _read_hf(spec: SourceSpec, split: str, max_bytes: int | None, progress: bool) -> tuple[bytes, str]:
    """The split's records' text_field joined with "\\n", streamed so that max_bytes reads only the start."""
    try:
        import datasets
    except ImportError:
        raise AbcgptError("Hugging Face sources need the optional extra: pip install 'abcgpt[hf]'") from None
    where = f"Hugging Face dataset {spec.hf}" + (f" ({spec.hf_config})" if spec.hf_config else "")
    where += (f" ({spec.hf_data_files})" if isinstance(spec.hf_data_files, str) else "") + f" split {split}"
    parts, n = [], 0
    try:
        ds = datasets.load_dataset(spec.hf, spec.hf_config, split=split, streaming=True,
                                   data_files=spec.hf_data_files)
        with tqdm(total=max_bytes, unit="B", unit_scale=True, desc=spec.name, disable=not progress) as bar:
            for rec in ds:
                if spec.text_field not in rec:
                    raise AbcgptError(f"{where} has no field {spec.text_field!r} (text_field); "
                                      f"its fields are {', '.join(rec)}")
                text = rec[spec.text_field]
                if not isinstance(text, str):
                    raise AbcgptError(f"{where}: field {spec.text_field!r} holds {type(text).__name__}, "
                                      "not text")
                parts.append(text.encode())
                n += len(parts[-1]) + 1
                bar.update(len(parts[-1]) + 1)
                if max_bytes is not None and n >= max_bytes:
                    break
    except AbcgptError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, hub errors, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AbcgptError(f"cannot load {where}: {msg}") from e
    return b"\n".join(parts)[:max_bytes], where
