"""What a command may replace, and how it writes (issue 23, docs/reliability.md): an output is replaced only when it
is the same command's own earlier output; no write follows a link planted in a run; temporaries have unique names;
one output has one writer at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe

from abcgpt.checkpoint import load_checkpoint
from abcgpt.cli import main
from abcgpt.common import OUTPUT_MARK, AbcgptError, atomic_dir, output_lock
from abcgpt.config import load_recipe
from abcgpt.train import train

ABCGPT = [sys.executable, "-m", "abcgpt"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A trained run (with its prepared data folder) and its recipe, written once for the module."""
    tmp = tmp_path_factory.mktemp("outputs")
    recipe = write_recipe(tmp)
    train(load_recipe(str(recipe), ["train.steps=10"]), tmp / "run", progress=False)
    return {"recipe": recipe, "run": tmp / "run", "data": tmp / "data"}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (lock files aside: they hold the last writer's PID)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def refused(capsys, *args: object) -> str:
    assert main([str(a) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("abcgpt: ")]
    assert len(err) == 1 and err[0].startswith("abcgpt: error: "), err
    return err[0]


def targets(made: dict[str, Path], tmp: Path) -> dict[str, Path]:
    """What no command may replace: a run, a checkpoint, a data folder, a folder of the user's own files."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("a user's own file")
    return {"run": made["run"], "checkpoint": made["run"] / "last", "data": made["data"], "folder": tmp / "mine"}


def commands(made: dict[str, Path], out: Path) -> dict[str, list]:
    """Every command that writes a folder, with out as its output (export with --force: it does not override)."""
    run, recipe = made["run"], made["recipe"]
    return {"prepare": ["prepare", "--config", recipe, "--out", out],
            "train": ["train", "--config", recipe, "--out", out, "--set", "train.steps=2"],
            "eval": ["eval", "--ckpt", run, "--quick", "--out", out],
            "export": ["export", "--ckpt", run, "--dial", "alpha", "--out", out, "--force"]}


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "export"])
def test_no_command_replaces_what_it_did_not_write(made, tmp_path, capsys, monkeypatch, command):
    """eval --out RUN deleted the run's checkpoints, prepare --out DIR a user's files: every writing command with
    every target it must not replace is refused in one line, and nothing there changes."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, target in targets(made, tmp_path).items():
        if (command, name) in (("train", "run"), ("prepare", "data")):
            continue  # its own kind of output: a run is resumed (test_train.py), data rebuilt
        before = tree(target)
        err = refused(capsys, *commands(made, target)[command])
        assert str(target) in err, (name, err)
        assert tree(target) == before, (command, name)


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "export"])
def test_the_current_folder_is_never_an_output(made, tmp_path, capsys, monkeypatch, command):
    """--out . gave a ValueError traceback (in eval, after the whole report was computed), and --out of a folder
    that holds the current one would replace it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):
        err = refused(capsys, *commands(made, Path(out))[command])
        assert ("current folder" in err or "not an abcgpt run" in err or "did not write" in err), err
    assert (work / "keep.txt").read_text() == "mine"


def test_own_earlier_output_is_replaced_and_marked(made, tmp_path, capsys, monkeypatch):
    """The same command's earlier output is replaced (that is what --force and a re-run are for); it carries the
    mark that says so, listing every file written. A file a user added to it makes it no longer replaceable."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    for dial in ("alpha", "omega"):
        assert main(["export", "--ckpt", str(made["run"]), "--dial", dial, "--out", str(out), "--force"]) == 0
    mark = json.loads((out / OUTPUT_MARK).read_text())
    assert mark["kind"] == "export" and set(mark["files"]) == {p.name for p in out.iterdir()} - {OUTPUT_MARK}
    assert json.loads((out / "config.json").read_text())["abcgpt"]["dial"] == {"alpha": 0.0, "omega": 1.0}
    (out / "notes.txt").write_text("mine")
    err = refused(capsys, "export", "--ckpt", made["run"], "--dial", "alpha", "--out", out, "--force")
    assert "notes.txt" in err and (out / "notes.txt").exists()

    # another kind of abcgpt output is not this command's own either
    (out / "notes.txt").unlink()
    err = refused(capsys, "prepare", "--config", made["recipe"], "--out", out)
    assert "abcgpt export" in err and (out / "config.json").exists()


def test_outputs_written_before_marks_are_still_replaced(made, tmp_path):
    """A checkpoint or prepared data written by an abcgpt that did not mark its outputs is recognised by its own
    manifest (config.json's file list, manifest.json's sources), so a run resumes and data is rebuilt as before."""
    from abcgpt.checkpoint import checkpoint_files
    from abcgpt.data import prepared_files

    assert checkpoint_files(made["run"] / "last") == {p.name for p in (made["run"] / "last").iterdir()} - {OUTPUT_MARK}
    assert prepared_files(made["data"]) == {p.name for p in made["data"].iterdir()} - {OUTPUT_MARK}
    assert checkpoint_files(made["data"]) is None and prepared_files(made["run"] / "last") is None


def test_a_link_planted_in_a_run_is_never_written_through(made, tmp_path, capsys):
    """RUN/.lock made a link to a file elsewhere: train --resume truncated that file and wrote its PID into it.
    Lock files and logs are opened without following links, and the file outside stays as it was."""
    victim = tmp_path / "victim.txt"
    for name in (".lock", "metrics.jsonl"):
        run = tmp_path / f"run{name}"
        subprocess.run(["cp", "-a", str(made["run"]), str(run)], check=True)
        victim.write_text("precious")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
        err = refused(capsys, "train", "--resume", run, "--steps", "12")
        assert "is a link" in err and name in err, err
        assert victim.read_text() == "precious"


def test_a_checkpoint_file_that_leads_outside_is_not_read(made, tmp_path):
    ckpt = tmp_path / "ckpt"
    subprocess.run(["cp", "-a", str(made["run"] / "last"), str(ckpt)], check=True)
    outside = tmp_path / "elsewhere.json"
    (ckpt / "tokenizer.json").rename(outside)
    (ckpt / "tokenizer.json").symlink_to(outside)
    with pytest.raises(AbcgptError, match="tokenizer.json is a link to .* outside the checkpoint folder"):
        load_checkpoint(ckpt)


def test_temporaries_are_unique_and_a_swapped_one_is_not_renamed_into_place(tmp_path):
    """Two writers shared the fixed name OUT.tmp: now each temporary has its own name, and what is renamed into
    place is the folder that was written (a link put in its place is refused)."""
    out = tmp_path / "out"
    with atomic_dir(out, "test") as a, atomic_dir(tmp_path / "other", "test") as b:
        assert a != b and a.parent == tmp_path and a.name.startswith("out.") and a.name.endswith(".tmp")
        (a / "x").write_text("1")
    assert (out / "x").read_text() == "1"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(AbcgptError, match="was replaced while abcgpt wrote it"):
        with atomic_dir(out, "test") as tmp:
            (tmp / "x").write_text("2")
            tmp.rename(tmp_path / "moved")
            tmp.symlink_to(elsewhere)
    assert (out / "x").read_text() == "1" and elsewhere.is_dir()


def test_a_second_writer_of_one_output_is_refused_naming_the_first(made, tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    with output_lock(out, wait=False):
        err = refused(capsys, "export", "--ckpt", made["run"], "--dial", "alpha", "--out", out)
    assert f"PID {os.getpid()}" in err and not out.exists()


@pytest.mark.slow
def test_writers_started_together_never_mix_their_outputs(made, tmp_path):
    """Two `export --out X --force` started together: 6 of 21 pairs failed with a misleading "No such file or
    directory", and once the alpha export exited 0 with omega's weights under alpha's model card. Now each pair
    ends with one export in place, whole, its card and weights from the same dial; a refused writer names the
    other's PID."""
    pytest.importorskip("transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def export(dial: str, out: Path) -> subprocess.Popen:
        return subprocess.Popen([*ABCGPT, "export", "--ckpt", str(made["run"]), "--dial", dial, "--out", str(out),
                                 "--force"], stderr=subprocess.PIPE, text=True, env=env)

    # each dial's export written alone: what a whole one looks like (exports are deterministic)
    alone = {dial: tree(tmp_path / dial) for dial in ("alpha", "omega") if export(dial, tmp_path / dial).wait() == 0}
    assert len(alone) == 2 and alone["alpha"] != alone["omega"]
    out = tmp_path / "hf"
    for _ in range(3):
        procs = {dial: export(dial, out) for dial in ("alpha", "omega")}
        ends = {dial: (p.wait(timeout=300), p.stderr.read()) for dial, p in procs.items()}
        assert any(code == 0 for code, _ in ends.values()), ends
        for code, err in ends.values():
            assert code == 0 or (code == 2 and "PID" in err and "Traceback" not in err), err
        written = {k: v for k, v in tree(out).items() if k != "README.md"}  # the card names its folder
        assert written in ({k: v for k, v in t.items() if k != "README.md"} for t in alone.values())
        assert not list(tmp_path.glob("hf.*.tmp"))
