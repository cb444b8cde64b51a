"""Crash consistency and hostile checkpoint files.

1. One training run is SIGKILLed again and again, at random moments and at moments when a checkpoint is being
   written (last.*.tmp on disk), and resumed each time: a loadable, verified checkpoint always exists, its step
   never goes back, a half-written last.*.tmp is never taken for a checkpoint, and the run finally ends with the
   same weights and logged losses as a run that was never interrupted.
2. Checkpoints with truncated, tampered or malicious files are refused with one clear line (exit code 2), and
   nothing in them is ever unpickled.
"""

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_recipe
from safetensors.torch import load_file, save_file

import abcgpt.checkpoint
import abcgpt.common
from abcgpt.checkpoint import load_checkpoint, resolve, restore_training_state, save_checkpoint
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.data import prepared_data
from abcgpt.train import train

# ----------------------------------------------------------------------------- 1. crash consistency

STEPS = 800  # more than 20 kills can use up: each lets the run go on for MAX_STEPS_PER_KILL steps at most
KILLS = 20
MAX_STEPS_PER_KILL = 30
RUN_ARGS = ["--steps", str(STEPS), "--set", "train.checkpoint_every=1", "--set", "train.eval_every=1000000",
            "--set", "train.threads=1", "--set", "train.log_every=5"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m abcgpt ...`, output to a file (a pipe nobody reads could fill up and stall the run)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "abcgpt", *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _on_disk_step(run: Path) -> int | None:
    """The step of the checkpoint a reader would load now (last/, else last.old/); None while unreadable."""
    for name in ("last", "last.old"):
        try:
            return json.loads((run / name / "config.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _writing(run: Path) -> Path | None:
    """The temporary folder a checkpoint is being written into (last.XXXXXXXX.tmp), if there is one."""
    return next(run.glob("last.*.tmp"), None)


def _wait_for_checkpoint_after(proc: subprocess.Popen, run: Path, step: int, log: Path) -> int:
    """Wait until the process has imported everything and written a checkpoint past `step`."""
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before being killed:\n{log.read_text()}"
        now = _on_disk_step(run)
        if now is not None and now > step:
            return now
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint past step {step} within 90 s:\n{log.read_text()}")


def _kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"the run ended ({proc.returncode}) before the kill: raise STEPS"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _train_log(run: Path) -> dict:
    """{step: loss} of the train records of metrics.jsonl; every step logged at most once."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)), "a step is logged twice or out of order"
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


@pytest.mark.slow
def test_repeated_sigkill_keeps_a_verified_checkpoint_and_resumes_exactly(tmp_path):
    rng = random.Random(20240611)
    recipe = write_recipe(tmp_path)
    prepared_data(load_recipe(str(recipe)), progress=False)  # ready before the two runs below read it at once
    # the uninterrupted run, alongside the killed one
    whole = _start(["train", "--config", str(recipe), "--out", str(tmp_path / "whole"), *RUN_ARGS],
                   tmp_path / "whole.log")
    run = tmp_path / "killed"
    log = tmp_path / "killed.0.log"
    proc = _start(["train", "--config", str(recipe), "--out", str(run), *RUN_ARGS], log)
    steps, hits = [0], {"last.*.tmp (files being written)": 0, "last.old, no last (between the renames)": 0,
                        "last.old beside last (old copy being removed)": 0}
    try:
        for i in range(KILLS):
            ready_at = _wait_for_checkpoint_after(proc, run, steps[-1], log)
            if i % 2 == 0:  # a random moment (sooner if the run races ahead: STEPS must not be reached)
                until = time.time() + rng.uniform(0.05, 0.6)
                while time.time() < until and (_on_disk_step(run) or 0) < ready_at + MAX_STEPS_PER_KILL:
                    time.sleep(0.002)
            else:  # hunt for a checkpoint write: kill the moment last.*.tmp shows up
                time.sleep(rng.uniform(0.0, 0.15))
                deadline = time.time() + 10
                while not _writing(run) and time.time() < deadline:
                    time.sleep(0.0002)
            _kill(proc)

            names = {p.name for p in run.iterdir()}  # where in save_checkpoint the kill landed, if in it
            if "last.old" in names:
                hits["last.old beside last (old copy being removed)" if "last" in names
                     else "last.old, no last (between the renames)"] += 1
            elif _writing(run):
                hits["last.*.tmp (files being written)"] += 1
            ckpt = load_checkpoint(run / "last")  # verifies every file against its recorded sha256
            assert ckpt.path.name in ("last", "last.old"), ckpt.path  # never last.*.tmp
            assert resolve(run).name in ("last", "last.old")  # nor when resolving the run directory
            step = ckpt.meta.step
            assert step >= ready_at > steps[-1], (step, ready_at, steps)  # never backwards
            assert step < STEPS
            try:  # a last.*.tmp that got as far as its config.json holds the next step, the write cut short
                assert json.loads((_writing(run) / "config.json").read_text())["step"] == step + 1
            except (OSError, ValueError, TypeError):
                pass  # no last.*.tmp, or its config.json only half written
            restore_training_state(ckpt, ckpt.model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu"))
            steps.append(step)
            log = tmp_path / f"killed.{i + 1}.log"
            proc = _start(["train", "--resume", str(run)], log)

        assert proc.wait(timeout=240) == 0, log.read_text()
        assert whole.wait(timeout=240) == 0, (tmp_path / "whole.log").read_text()
    finally:
        for p in (proc, whole):
            if p.poll() is None:
                p.kill()
                p.wait()

    during_write = sum(hits.values())
    print(f"\n{KILLS} kills at steps {steps[1:]}; {during_write} during a checkpoint write: {hits}")
    assert during_write >= 1, "no kill landed during a checkpoint write"
    assert not _writing(run) and not (run / "last.old").exists()
    assert load_checkpoint(run / "last").meta.step == STEPS
    a = load_file(str(run / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log reads as one run, with the losses of the run that was never interrupted
    killed_log, whole_log = _train_log(run), _train_log(tmp_path / "whole")
    assert killed_log == whole_log and max(killed_log) == STEPS


def test_crash_while_replacing_a_recovered_checkpoint_keeps_one(tmp_path, monkeypatch):
    """A crash between the two renames of a swap leaves only last.old (and a finished last.*.tmp). The next save
    must keep a loadable checkpoint at every moment; a crash just before its tmp -> last rename must not leave
    the run with none."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    train(recipe, run, progress=False)
    shutil.rmtree(run / "best")
    shutil.copytree(run / "last", run / "last.a1b2c3d4.tmp")  # the finished new checkpoint ...
    (run / "last").rename(run / "last.old")  # ... that a crash kept from being renamed into place
    ckpt = load_checkpoint(run / "last")
    assert ckpt.path.name == "last.old"

    real_replace = os.replace

    class Crash(BaseException):
        pass

    def replace(src, dst):
        if Path(dst) == run / "last":
            raise Crash  # the process dies right before the new checkpoint is renamed into place
        real_replace(src, dst)

    monkeypatch.setattr(abcgpt.common.os, "replace", replace)
    with pytest.raises(Crash):
        save_checkpoint(run / "last", ckpt.model, ckpt.recipe, ckpt.tokenizer, ckpt.sources, 5)
    monkeypatch.undo()
    assert load_checkpoint(run / "last").meta.step in (4, 5)


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    """A write that fails midway (here: the disk fills up while the optimizer state is written) is one line naming
    the checkpoint; the half-written last.*.tmp is removed and the checkpoint that was there is untouched."""
    recipe = load_recipe(str(write_recipe(tmp_path)), ["train.steps=4", "train.checkpoint_every=2"])
    train(recipe, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "last"
    ckpt = load_checkpoint(last)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(abcgpt.checkpoint, "save_file", full)
    optimizer = ckpt.model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu")
    with pytest.raises(AbcgptError, match=f"cannot write {last}: No space left on device"):
        save_checkpoint(last, ckpt.model, ckpt.recipe, ckpt.tokenizer, ckpt.sources, 5, optimizer=optimizer)
    assert not _writing(tmp_path / "run")
    assert load_checkpoint(last).meta.step == 4


# ----------------------------------------------------------------------------- 2. hostile files


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    recipe = load_recipe(str(write_recipe(tmp)), ["train.steps=6", "train.checkpoint_every=3",
                                                  "train.eval_every=1000"])
    train(recipe, tmp / "run", progress=False)
    shutil.rmtree(tmp / "run" / "best")  # only last/: the tampered checkpoint is the one every command reads
    return tmp / "run"


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A fresh copy of the trained run to tamper with."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _rehash(ckpt: Path) -> None:
    """Record the files' current sha256 in config.json, as a tamperer who knows the format would."""
    meta = json.loads((ckpt / "config.json").read_text())
    meta["files"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in meta["files"]}
    (ckpt / "config.json").write_text(json.dumps(meta, indent=2))


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _refused(capsys, argv: list[str], *needles: str, one_line: bool = True) -> str:
    """The CLI refuses with exit code 2 and one line on stderr, `abcgpt: error: ...`."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("abcgpt: error: "), err
    if one_line:
        assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _sample(run: Path) -> list[str]:
    return ["sample", "--ckpt", str(run / "last"), "--max-new-tokens", "5", "--seed", "0"]


def _resume(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--steps", "9"]


def test_untouched_copy_loads_and_resumes(run, capsys):
    """The baseline for the tests below: the same commands succeed on the checkpoint as written."""
    assert main(_sample(run)) == 0
    assert main(_resume(run)) == 0
    assert load_checkpoint(run / "last").meta.step == 9


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-stale", "hash-recomputed"])
def test_truncated_model_is_refused(run, capsys, rehash):
    _truncate(run / "last" / "model.safetensors")
    if rehash:
        _rehash(run / "last")
    needle = "cannot be loaded" if rehash else "model.safetensors does not match its recorded sha256"
    for argv in (_sample(run), _resume(run)):
        _refused(capsys, argv, needle)
    with pytest.raises(AbcgptError):
        load_checkpoint(run / "last")


def test_truncated_config_is_refused(run, capsys):
    _truncate(run / "last" / "config.json")
    for argv in (_sample(run), _resume(run)):
        _refused(capsys, argv, "config.json is corrupted")


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-stale", "hash-recomputed"])
@pytest.mark.parametrize("victim", ["optimizer.safetensors", "model.safetensors"])
def test_pickle_in_place_of_a_safetensors_file_is_never_unpickled(run, capsys, tmp_path, rehash, victim):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Payload(armed)))  # the payload works: unpickling it does run the command
    assert armed.exists()
    (run / "last" / victim).write_bytes(payload)
    if rehash:
        _rehash(run / "last")
    # with its hash intact, the file is named; a model file that passes the hash check is "cannot be loaded"
    needle = victim if not rehash or victim == "optimizer.safetensors" else "cannot be loaded"
    _refused(capsys, _resume(run), needle)
    if victim == "model.safetensors" or not rehash:
        _refused(capsys, _sample(run), needle)
    else:  # sampling never reads the optimizer state: it may go on, and still unpickles nothing
        assert main(_sample(run)) == 0
    if victim == "optimizer.safetensors" and rehash:
        ckpt = load_checkpoint(run / "last")
        with pytest.raises(AbcgptError, match="optimizer.safetensors is corrupted"):
            restore_training_state(ckpt, ckpt.model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu"))
    assert not marker.exists(), "the checkpoint's pickle was executed"


def test_tampered_tokenizer_is_refused(run, capsys):
    tok = run / "last" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"a"', '"A"'))  # same size, another character
    for argv in (_sample(run), _resume(run)):
        _refused(capsys, argv, "tokenizer.json does not match its recorded sha256")


def test_tokenizer_replaced_by_garbage_is_refused_even_with_its_hash(run, capsys):
    (run / "last" / "tokenizer.json").write_bytes(b"\x80\x81 not json")
    _rehash(run / "last")
    for argv in (_sample(run), _resume(run)):
        _refused(capsys, argv, "tokenizer")


def test_tokenizer_swapped_with_its_hash_recomputed_is_refused_by_resume(run, capsys):
    """A valid tokenizer of the same size but other characters: resume notices it is not the data's."""
    tok = run / "last" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"a"', '"A"'))
    _rehash(run / "last")
    _refused(capsys, _resume(run), "has another tokenizer than the run")


def test_tokenizer_larger_than_the_model_is_refused(run, capsys):
    tok = run / "last" / "tokenizer.json"
    chars = json.loads(tok.read_text())["chars"]
    tok.write_text(json.dumps({"kind": "char", "chars": sorted(chars + ["~"])}))  # "~" sorts last: id 16
    _rehash(run / "last")
    _refused(capsys, _sample(run)[:-2] + ["--prompt", "~"], "tokenizer")


def _add_tensor(ckpt: Path, name: str) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    tensors[name] = torch.randn_like(tensors["lm_head.weight"])
    save_file(tensors, str(f))
    _rehash(ckpt)


EXTRA = pytest.mark.parametrize("name", ["evil.weight", "transformer.wte.weight"], ids=["extra", "tied-alias"])


@EXTRA
def test_extra_tensor_in_the_model_is_refused(run, capsys, name):
    """An unexpected tensor (or a second copy of the tied embedding, with other values) is refused by the strict
    load, even with the file's hash recomputed."""
    _add_tensor(run / "last", name)
    for argv in (_sample(run), _resume(run)):
        _refused(capsys, argv, "cannot be loaded", name)
    with pytest.raises(AbcgptError, match="Unexpected key"):
        load_checkpoint(run / "last")


@EXTRA
def test_extra_tensor_error_is_one_line(run, capsys, name):
    _add_tensor(run / "last", name)
    _refused(capsys, _sample(run), "cannot be loaded", name)


def _drop_rng_state(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    del tensors["rng.torch"]
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    _rehash(ckpt)


def _misshape_moment(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    tensors["opt.0.exp_avg"] = torch.zeros(3)
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    _rehash(ckpt)


def _edit_config(**model):
    def edit(ckpt: Path) -> None:
        meta = json.loads((ckpt / "config.json").read_text())
        for k, v in model.items():
            if k in ("step", "files"):
                meta[k] = v
            else:
                meta["recipe"]["model"][k] = v
        (ckpt / "config.json").write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize("tamper, command, error", [
    (_drop_rng_state, _resume, KeyError),
    (_misshape_moment, _resume, RuntimeError),
    (_edit_config(n_head=0), _sample, ZeroDivisionError),
    (_edit_config(step="6"), _resume, TypeError),
    (_edit_config(files=["model.safetensors"]), _sample, AttributeError),
], ids=["optimizer-without-rng", "optimizer-misshapen-moment", "config-n_head-0", "config-step-str",
        "config-files-list"])
def test_wrong_content_in_well_formed_files_is_refused(run, capsys, tamper, command, error):
    tamper(run / "last")
    try:
        _refused(capsys, command(run))
    except error as e:
        pytest.fail(f"{type(e).__name__} traceback instead of a one-line error: {e}")
