import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from abcgpt.common import AbcgptError
from abcgpt.sources import BUILTIN_SOURCES, VOICES, SourceSpec, SourceText, load_source, normalize_reference

# the shared corpora, read before the autouse fixture below clears $ABCGPT_DATA_DIR
DATA = Path(os.environ.get("ABCGPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "shakespeare" / "input.txt").is_file(),
                                reason=f"no corpora in {DATA} (set $ABCGPT_DATA_DIR)")
needs_voices = pytest.mark.skipif(not (DATA / "voices" / "SOURCES.md").is_file(),
                                  reason=f"no voices corpora in {DATA}/voices (set $ABCGPT_DATA_DIR)")


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    """Nothing from the real environment: no data dir, no mirror, a fresh cache."""
    monkeypatch.delenv("ABCGPT_DATA_DIR", raising=False)
    monkeypatch.delenv("ABCGPT_MIRROR", raising=False)
    monkeypatch.setenv("ABCGPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def load(spec, **kw) -> SourceText:
    return load_source(spec, progress=False, **kw)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------- built-ins from a data dir


@needs_data
def test_shakespeare_from_data_dir(monkeypatch):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    raw = (DATA / "shakespeare" / "input.txt").read_bytes()
    s = load(SourceSpec("shakespeare"))
    # train is a strict prefix and heldout exactly the rest: they cannot overlap
    assert s.train + s.heldout == raw.decode()
    assert s.train and s.heldout
    assert 0.095 < len(s.heldout) / len(raw) < 0.105
    assert s.train.endswith("\n")  # cut at a line start, no line shared
    assert s.sha256 == {"all": sha(raw)}
    assert s.origin == "$ABCGPT_DATA_DIR/shakespeare/input.txt (last 10% held out)"
    s2 = load(SourceSpec("shakespeare"), heldout_fraction=0.25)
    assert s2.train + s2.heldout == raw.decode() and 0.245 < len(s2.heldout) / len(raw) < 0.255


@needs_data
@pytest.mark.parametrize("name, file", [("kjv", "kjv/kjv.txt"), ("python", "python/cpython311_stdlib.txt")])
def test_local_only_builtins(monkeypatch, name, file):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    raw = (DATA / file).read_text()
    s = load(SourceSpec(name))
    assert s.train + s.heldout == raw and s.train.endswith("\n")
    assert 0.09 < len(s.heldout) / len(raw) < 0.11


@needs_data
def test_tinystories_from_data_dir(monkeypatch):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    train = (DATA / "tinystories" / "train.txt").read_bytes()
    valid = (DATA / "tinystories" / "valid.txt").read_bytes()
    s = load(SourceSpec("tinystories"))
    assert s.train == train.decode() and s.heldout == valid.decode()  # the official validation file
    assert s.sha256 == {"train": sha(train), "heldout": sha(valid)}
    s = load(SourceSpec("tinystories", max_bytes=100_000))
    assert s.train == train[:100_000].decode() and s.heldout == valid.decode()
    assert s.sha256["train"] == sha(train[:100_000])
    assert "first 100,000 bytes" in s.origin and "valid.txt" in s.origin


def test_local_only_builtin_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(AbcgptError, match=r"kjv/kjv\.txt.*ABCGPT_DATA_DIR") as e:
        load(SourceSpec("kjv"))
    assert str(tmp_path / "kjv" / "kjv.txt") in str(e.value)


# ----------------------------------------------------------------------------- downloads from a local server


@pytest.fixture
def server():
    """An HTTP server for the shared corpora that records each request's path and Range header."""
    srv = SimpleNamespace(seen=[], ranges=True, short=False)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            srv.seen.append((self.path, rng))
            f = DATA / self.path.lstrip("/")
            if ".." in self.path or not f.is_file():
                self.send_error(404)
                return
            data = f.read_bytes()
            m = re.fullmatch(r"bytes=0-(\d+)", rng or "")
            if m and srv.ranges:
                body = data[: int(m[1]) + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(data)}")
            else:
                body = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body[: len(body) // 2] if srv.short else body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stops reading once it has max_bytes

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    srv.url = f"http://127.0.0.1:{httpd.server_port}"
    yield srv
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def mirror(server, monkeypatch):
    monkeypatch.setenv("ABCGPT_MIRROR", server.url)
    return server


@needs_data
def test_download_from_mirror_then_cache(mirror, env, capsys):
    raw = (DATA / "shakespeare" / "input.txt").read_bytes()
    s = load_source(SourceSpec("shakespeare"), progress=True)
    assert s.train + s.heldout == raw.decode() and s.sha256 == {"all": sha(raw)}
    assert mirror.seen == [("/shakespeare/input.txt", None)]
    assert f"{mirror.url}/shakespeare/input.txt" in s.origin
    assert (env / "shakespeare" / "input.txt").read_bytes() == raw
    assert [p.name for p in (env / "shakespeare").iterdir()] == ["input.txt"]  # no temp file left
    assert "input.txt" in capsys.readouterr().err  # the progress bar
    again = load(SourceSpec("shakespeare"))
    assert mirror.seen == [("/shakespeare/input.txt", None)]  # from the cache
    assert (again.train, again.heldout, again.sha256) == (s.train, s.heldout, s.sha256)
    # a cached full file also serves a max_bytes request
    part = load(SourceSpec("shakespeare", max_bytes=5000))
    assert len(mirror.seen) == 1 and part.train + part.heldout == raw[:5000].decode()


@needs_data
def test_download_max_bytes_uses_range(mirror, env):
    train = (DATA / "tinystories" / "train.txt").read_bytes()
    valid = (DATA / "tinystories" / "valid.txt").read_bytes()
    s = load(SourceSpec("tinystories", max_bytes=50_000))
    assert sorted(mirror.seen) == [("/tinystories/train.txt", "bytes=0-49999"),
                                   ("/tinystories/valid.txt", None)]
    assert s.train == train[:50_000].decode() and s.heldout == valid.decode()
    assert s.sha256 == {"train": sha(train[:50_000]), "heldout": sha(valid)}
    assert (env / "tinystories" / "train.first50000bytes.txt").stat().st_size == 50_000
    assert not (env / "tinystories" / "train.txt").exists()
    load(SourceSpec("tinystories", max_bytes=50_000))
    assert len(mirror.seen) == 2  # both files from the cache
    # the partial copy is not mistaken for the whole file
    full = load(SourceSpec("tinystories"))
    assert mirror.seen[-1] == ("/tinystories/train.txt", None) and full.train == train.decode()


@needs_data
def test_server_that_ignores_range(mirror, env):
    mirror.ranges = False
    raw = (DATA / "shakespeare" / "input.txt").read_bytes()
    s = load(SourceSpec("shakespeare", max_bytes=10_000))
    assert mirror.seen == [("/shakespeare/input.txt", "bytes=0-9999")]
    assert s.train + s.heldout == raw[:10_000].decode() and s.sha256 == {"all": sha(raw[:10_000])}
    assert (env / "shakespeare" / "input.first10000bytes.txt").read_bytes() == raw[:10_000]


@needs_data
def test_download_errors(server, monkeypatch, env):
    monkeypatch.setenv("ABCGPT_MIRROR", server.url + "/missing")
    with pytest.raises(AbcgptError, match="404") as e:
        load(SourceSpec("shakespeare"))
    assert f"{server.url}/missing/shakespeare/input.txt" in str(e.value)
    with pytest.raises(AbcgptError, match=re.escape(f"{server.url}/nope.txt") + ".*404"):
        load(SourceSpec("u", url=server.url + "/nope.txt"))
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AbcgptError, match=re.escape(f"http://127.0.0.1:{port}/x.txt")):
        load(SourceSpec("u", url=f"http://127.0.0.1:{port}/x.txt"))
    server.short = True  # the connection drops halfway through
    monkeypatch.setenv("ABCGPT_MIRROR", server.url)
    with pytest.raises(AbcgptError, match=r"input\.txt was cut off after 557,697 of 1,115,394 bytes"):
        load(SourceSpec("shakespeare"))
    assert [p for p in env.rglob("*") if p.is_file()] == []  # no partial or temporary file left behind


@needs_data
def test_url_source(server, env):
    raw = (DATA / "kjv" / "kjv.txt").read_bytes()
    spec = SourceSpec("bible", url=server.url + "/kjv/kjv.txt", max_bytes=20_000)
    s = load(spec)
    assert server.seen == [("/kjv/kjv.txt", "bytes=0-19999")]
    assert s.train + s.heldout == raw[:20_000].decode() and s.train.endswith("\n")
    assert load(spec).train == s.train and len(server.seen) == 1  # cached
    valid = (DATA / "tinystories" / "valid.txt").read_text()
    s = load(SourceSpec("ts", url=server.url + "/tinystories/train.txt", max_bytes=3000,
                        heldout_url=server.url + "/tinystories/valid.txt"))
    assert s.heldout == valid and len(s.train.encode()) == 3000 and set(s.sha256) == {"train", "heldout"}


# ----------------------------------------------------------------------------- local paths


def test_path_file_and_folder(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    s = load(SourceSpec("one", path=str(f)))
    assert s.train + s.heldout == f.read_text()
    assert s.heldout == "".join(f"line {i}\n" for i in range(90, 100))
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "2.txt").write_text("two\n")
    (d / "a.txt").write_text("one")
    (d / "c.txt").write_text("three\n")
    (d / "notes.md").write_text("not text")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "held.txt").write_text("held out\n")
    s = load(SourceSpec("dir", path=str(d), heldout_path=str(tmp_path / "held.txt")))
    assert s.train == "one\ntwo\n\nthree\n" and s.heldout == "held out\n"  # sorted by path, joined with "\n"
    assert s.sha256 == {"train": sha(b"one\ntwo\n\nthree\n"), "heldout": sha(b"held out\n")}
    s = load(SourceSpec("dir", path=str(d), heldout_path=str(tmp_path / "held.txt"), max_bytes=6))
    assert s.train == "one\ntw"


def test_max_bytes_drops_a_cut_character(tmp_path):
    f = tmp_path / "u.txt"
    f.write_bytes("abcé\nxyz\n".encode())  # é is 2 bytes, at offsets 3-4
    (tmp_path / "h.txt").write_text("h\n")
    s = load(SourceSpec("u", path=str(f), heldout_path=str(tmp_path / "h.txt"), max_bytes=4))
    assert s.train == "abc"


def test_path_errors(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(AbcgptError, match=r"empty\.txt is empty"):
        load(SourceSpec("e", path=str(tmp_path / "empty.txt")))
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(AbcgptError, match=r"bad\.txt is not UTF-8 text: byte 0xff at offset 3"):
        load(SourceSpec("b", path=str(tmp_path / "bad.txt")))
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("fine\n")
    (tmp_path / "d" / "sub" / "bad.txt").write_bytes(b"abc\xe9def")
    with pytest.raises(AbcgptError, match=r"sub/bad\.txt is not UTF-8 text: byte 0xe9 at offset 3"):
        load(SourceSpec("d", path=str(tmp_path / "d")))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.md").write_text("x")
    with pytest.raises(AbcgptError, match="has no .txt files"):
        load(SourceSpec("n", path=str(tmp_path / "none")))
    with pytest.raises(AbcgptError, match="no such file or folder: " + re.escape(str(tmp_path / "gone.txt"))):
        load(SourceSpec("g", path=str(tmp_path / "gone.txt")))
    (tmp_path / "short.txt").write_text("x")
    with pytest.raises(AbcgptError, match="too short to hold out"):
        load(SourceSpec("s", path=str(tmp_path / "short.txt")))
    for bad in (0, 0.6, -0.1):
        with pytest.raises(AbcgptError, match=r"heldout_fraction must be in \(0, 0.5\]"):
            load(SourceSpec("s", path=str(tmp_path / "short.txt")), heldout_fraction=bad)


# ----------------------------------------------------------------------------- specs


def test_spec_from_dict_errors():
    with pytest.raises(AbcgptError, match=r"unknown key 'pth'.*allowed keys: name, path, url"):
        SourceSpec.from_dict({"name": "x", "pth": "a.txt"})
    with pytest.raises(AbcgptError, match=r"unknown built-in source 'shakespear' \(did you mean shakespeare\?\): "
                                          "built-ins are shakespeare,"):
        SourceSpec.from_dict({"name": "shakespear"})
    with pytest.raises(AbcgptError, match="at most one of path, url, hf.*path and url"):
        SourceSpec.from_dict({"name": "x", "path": "a.txt", "url": "http://h/a.txt"})
    with pytest.raises(AbcgptError, match="normalize must be one of none, reference, got 'lower'"):
        SourceSpec.from_dict({"name": "shakespeare", "normalize": "lower"})
    with pytest.raises(AbcgptError, match="weight must be a number > 0, got -1.0"):
        SourceSpec.from_dict({"name": "shakespeare", "weight": -1})
    with pytest.raises(AbcgptError, match="weight must be a number > 0, got 0.0"):
        SourceSpec.from_dict({"name": "shakespeare", "weight": 0})
    with pytest.raises(AbcgptError, match="max_bytes must be a positive"):
        SourceSpec.from_dict({"name": "shakespeare", "max_bytes": 0})
    with pytest.raises(AbcgptError, match="max_bytes must be int or None, got '10'"):
        SourceSpec.from_dict({"name": "shakespeare", "max_bytes": "10"})
    with pytest.raises(AbcgptError, match="max_bytes must be int or None, got True"):
        SourceSpec.from_dict({"name": "shakespeare", "max_bytes": True})
    with pytest.raises(AbcgptError, match="only apply to hf sources"):
        SourceSpec.from_dict({"name": "x", "path": "a.txt", "heldout_split": "validation"})
    with pytest.raises(AbcgptError, match="url must be an http"):
        SourceSpec.from_dict({"name": "x", "url": "ftp://h/a.txt"})
    with pytest.raises(AbcgptError, match="no name"):
        SourceSpec.from_dict({"path": "a.txt"})


def test_spec_round_trip():
    assert SourceSpec.from_dict("kjv") == SourceSpec("kjv")
    spec = SourceSpec.from_dict({"name": "ts", "hf": "roneneldan/TinyStories", "heldout_split": "validation",
                                 "max_bytes": 1000, "weight": 2})
    assert spec.weight == 2.0 and isinstance(spec.weight, float)
    d = spec.to_dict()
    assert d == {"name": "ts", "hf": "roneneldan/TinyStories", "heldout_split": "validation",
                 "max_bytes": 1000, "weight": 2.0}
    assert SourceSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert SourceSpec("shakespeare").to_dict() == {"name": "shakespeare"}
    assert set(BUILTIN_SOURCES) == {"shakespeare", "tinystories", "kjv", "python", *VOICES}


def test_normalize_reference(tmp_path):
    text = "First Citizen:\nBefore we proceed,  hear me speak.\n\tAll:\tSpeak, speak!\n"
    want = "first citizen :\nbefore we proceed , hear me speak .\nall : speak , speak !\n"
    assert normalize_reference(text) == want
    f = tmp_path / "s.txt"
    f.write_text(text)
    (tmp_path / "h.txt").write_text("O Romeo, Romeo!\n")
    s = load(SourceSpec("s", path=str(f), heldout_path=str(tmp_path / "h.txt"), normalize="reference"))
    assert (s.train, s.heldout) == (want, "o romeo , romeo !\n")
    assert s.sha256["train"] == sha(text.encode())  # of the raw bytes, before normalisation


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_needs_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(AbcgptError, match=re.escape("pip install 'abcgpt[hf]'")):
        load(SourceSpec("h", hf="json", hf_data_files="x.jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_source_from_local_json(tmp_path):
    train = [f"story {i} é" for i in range(40)]
    valid = ["valid one", "valid two"]
    for name, rows in (("train", train), ("valid", valid)):
        lines = [json.dumps({"text": t, "id": 1}) + "\n" for t in rows]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    s = load(SourceSpec("h", hf="json", hf_data_files=str(tmp_path / "train.jsonl")))
    assert s.train + s.heldout == "\n".join(train)
    assert s.heldout == "\n".join(train[36:]) and s.sha256 == {"all": sha("\n".join(train).encode())}
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "valid.jsonl")}
    s = load(SourceSpec("h", hf="json", hf_data_files=files, heldout_split="validation", max_bytes=20))
    assert s.train == "story 0 é\nstory 1 "  # the é cut in half at byte 20 is dropped
    assert s.heldout == "valid one\nvalid two"
    with pytest.raises(AbcgptError, match="no field 'body'.*fields are text, id"):
        load(SourceSpec("h", hf="json", hf_data_files=str(tmp_path / "train.jsonl"), text_field="body"))
    # streaming stops at max_bytes: a bad record further on is never read
    lines = [json.dumps({"text": "x" * 10}) + "\n"] * 5 + [json.dumps({"text": None}) + "\n"]
    (tmp_path / "stop.jsonl").write_text("".join(lines))
    s = load(SourceSpec("h", hf="json", hf_data_files=str(tmp_path / "stop.jsonl"), max_bytes=30))
    assert s.train + s.heldout == "xxxxxxxxxx\nxxxxxxxxxx\nxxxxxxxx"
    with pytest.raises(AbcgptError, match="holds NoneType, not text"):
        load(SourceSpec("h", hf="json", hf_data_files=str(tmp_path / "stop.jsonl")))
    with pytest.raises(AbcgptError, match="cannot load Hugging Face dataset json"):
        load(SourceSpec("h", hf="json", hf_data_files=str(tmp_path / "gone.jsonl")))


# ----------------------------------------------------------------------------- the voices


def test_voices_are_built_ins():
    assert len(VOICES) == 28 and all(about for about in VOICES.values())
    for name in VOICES:
        b = BUILTIN_SOURCES[name]
        assert (b.folder, b.file, b.url, b.heldout_file) == (f"voices/{name}", "text.txt", None, None)
        assert SourceSpec.from_dict(name) == SourceSpec(name)


@needs_voices
def test_the_voices_table_names_every_voices_folder():
    """One table in sources.py: it must name every corpus voices/build.sh wrote, and nothing else."""
    folders = {p.parent.name for p in (DATA / "voices").glob("*/text.txt")}
    assert set(VOICES) == folders
    table = (DATA / "voices" / "SOURCES.md").read_text()
    assert all(f"| {name} |" in table for name in VOICES)


@needs_voices
def test_voice_from_data_dir(monkeypatch):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    raw = (DATA / "voices" / "fortunes_en" / "text.txt").read_bytes()
    s = load(SourceSpec("fortunes_en"))
    assert s.train + s.heldout == raw.decode() and s.train.endswith("\n")
    assert 0.095 < len(s.heldout) / len(raw) < 0.105  # the last heldout_fraction
    assert s.origin == "$ABCGPT_DATA_DIR/voices/fortunes_en/text.txt (last 10% held out)"
    part = load(SourceSpec("man_de", max_bytes=20_000), heldout_fraction=0.2)
    raw = (DATA / "voices" / "man_de" / "text.txt").read_bytes()[:20_000]
    assert part.train + part.heldout == raw.decode("utf-8", "ignore") and 0.19 < len(part.heldout) / 20_000 < 0.21


@needs_voices
def test_voice_from_mirror_then_cache(mirror, env):
    raw = (DATA / "voices" / "devils_dictionary" / "text.txt").read_bytes()
    s = load(SourceSpec("devils_dictionary", max_bytes=30_000))
    assert mirror.seen == [("/voices/devils_dictionary/text.txt", "bytes=0-29999")]
    assert s.train + s.heldout == raw[:30_000].decode()
    assert (env / "voices" / "devils_dictionary" / "text.first30000bytes.txt").read_bytes() == raw[:30_000]
    load(SourceSpec("devils_dictionary", max_bytes=30_000))
    assert len(mirror.seen) == 1  # from the cache


def test_voice_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ABCGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(AbcgptError, match=r"built-in source 'foldoc' has no download URL and voices/foldoc/text\.txt "
                                          "was not found") as e:
        load(SourceSpec("foldoc"))
    assert str(tmp_path / "voices" / "foldoc" / "text.txt") in str(e.value)


def test_unknown_built_in_lists_every_name_on_one_line():
    with pytest.raises(AbcgptError) as e:
        SourceSpec("fortune_en")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 700
    assert msg.startswith("unknown built-in source 'fortune_en' (did you mean fortunes_en, ")
    assert all(name in msg for name in BUILTIN_SOURCES) and "`abcgpt sources`" in msg
    assert msg.endswith("or give path, url or hf")
    with pytest.raises(AbcgptError, match=r"^unknown built-in source 'poems': built-ins are shakespeare, "):
        SourceSpec("poems")


def test_sources_command_lists_the_built_ins(monkeypatch, capsys):
    from abcgpt.cli import main

    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    assert main(["sources"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert list(rows) == list(BUILTIN_SOURCES)
    assert VOICES["fortunes_en"] in rows["fortunes_en"]
    if (DATA / "voices" / "fortunes_en" / "text.txt").is_file():
        assert "$ABCGPT_DATA_DIR" in rows["fortunes_en"]


@needs_voices
def test_a_recipe_of_voices_prepares(tmp_path, monkeypatch):
    from abcgpt.config import load_recipe
    from abcgpt.data import load_data, prepare

    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    (tmp_path / "two.toml").write_text(f"""
[data]
dir = "{tmp_path / 'data'}"
tokenizer = "char"

[[data.sources]]
name = "fortunes_en"
max_bytes = 50_000

[[data.sources]]
name = "python_stdlib"
max_bytes = 50_000
""")
    data = load_data(prepare(load_recipe(str(tmp_path / "two.toml")), progress=False))
    assert data.sources == ["fortunes_en", "python_stdlib"]
    for name, train, heldout in zip(data.sources, data.train, data.heldout):
        assert (tmp_path / "data" / f"{name}.train.bin").stat().st_size > 0
        assert train.size > 40_000 and heldout.size > 4_000, name


@needs_voices
def test_the_voices_recipe(tmp_path, monkeypatch):
    """configs/voices.toml: at least 16 voices, each capped, char-level; prepared, its vocabulary stays small."""
    from abcgpt.config import load_recipe
    from abcgpt.data import load_data, prepare

    monkeypatch.setenv("ABCGPT_DATA_DIR", str(DATA))
    recipe = load_recipe("voices")
    names = [s.name for s in recipe.data.sources]
    assert len(names) >= 16 and set(names) <= set(VOICES) and recipe.data.tokenizer == "char"
    assert all(s.max_bytes == 400_000 for s in recipe.data.sources)
    data = load_data(prepare(recipe, tmp_path / "data", progress=False))
    assert data.sources == names and all(a.size > 300_000 for a in data.train)
    assert data.manifest["vocab_size"] < 256
