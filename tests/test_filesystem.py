"""When the filesystem is not kind, and when the user presses Ctrl-C (docs/reliability.md): a read-only run, a
full disk, two trainers on one run, interrupts. Each ends in one line naming the path (exit 2, or 130 for Ctrl-C),
with every checkpoint as it was and no temporary left behind."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import source_tables, write_recipe

from abcgpt.checkpoint import load_checkpoint
from abcgpt.cli import main
from abcgpt.config import load_recipe
from abcgpt.train import train

ABCGPT = [sys.executable, "-m", "abcgpt"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("fs"))


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe(str(recipe), ["train.steps=20", "train.eval_every=10"]), out, progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A finished 20-step run of its own (tests below break it): a copy of one trained run."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def one_line_error(capsys, *args, code: int = 2) -> str:
    """The error line (training's progress bar may come before it on stderr)."""
    got = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("abcgpt: ")]
    assert len(lines) == 1 and lines[0].startswith("abcgpt: error: ") and "Traceback" not in err, err
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- read-only


@contextmanager
def read_only(path: Path):
    """path made read-only for this process: by permissions when we are not root (root ignores them), else by a
    read-only bind mount; skipped where neither is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    if shutil.which("mount") is None or subprocess.run(["mount", "--bind", path, path]).returncode:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", path, path]).returncode:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", path])


@pytest.mark.parametrize("command", [
    ["calibrate", "--ckpt", "{run}", "--samples", "1"],
    ["eval", "--ckpt", "{run}", "--quick"],
    ["train", "--resume", "{run}", "--steps", "30"],
    ["export", "--ckpt", "{run}", "--dial", "alpha", "--out", "{run}/exported"],
    ["prepare", "--config", "{recipe}", "--out", "{run}/data"],
])
def test_read_only_run_is_refused_before_the_work(run, recipe, capsys, command):
    args = [a.format(run=run, recipe=recipe) for a in command]
    before = snapshot(run)
    with read_only(run):
        err = one_line_error(capsys, *args)
    assert f"cannot write {run}" in err and ("Read-only file system" in err or "Permission denied" in err)
    assert snapshot(run) == before and not temporaries(run)


# ----------------------------------------------------------------------------- a full disk


@contextmanager
def small_disk(path: Path, size_kb: int):
    """A folder with room for size_kb KiB: a tmpfs where we may mount one (root); skipped elsewhere."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", path]).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", path])


def test_full_disk_during_resume_keeps_the_checkpoints(run, tmp_path, capsys):
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024
    last = (run / "last" / "model.safetensors").stat().st_size // 1024
    with small_disk(tmp_path / "disk", used + last // 2 + 64) as disk:  # room for the run, not another checkpoint
        shutil.copytree(run, disk / "run")
        err = one_line_error(capsys, "train", "--resume", disk / "run", "--steps", "40")
        assert "No space left on device" in err and str(disk / "run") in err
        assert load_checkpoint(disk / "run" / "last").meta.step in (20, 30)  # intact, verified by its hashes
        assert not temporaries(disk)


@pytest.mark.slow
def test_file_size_limit_during_resume_keeps_the_checkpoints(run, recipe):
    """The same, portable: a real kernel refusal (RLIMIT_FSIZE: EFBIG) in a child process, no privileges needed."""
    limit = (run / "last" / "model.safetensors").stat().st_size // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([*ABCGPT, "train", "--resume", str(run), "--steps", "40"], capture_output=True, text=True,
                       preexec_fn=limited, env=os.environ | {"OMP_NUM_THREADS": "1"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err[-1].startswith("abcgpt: error: cannot write ") and "File too large" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert load_checkpoint(run / "last").meta.step in (20, 30) and not temporaries(run)


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_injected_no_space_on_save(run, capsys, monkeypatch, failure):
    """The error path alone, wherever disks cannot be filled: save_model raises ENOSPC as a full disk would."""
    from safetensors import SafetensorError

    import abcgpt.checkpoint

    def full(*args, **kwargs):
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(abcgpt.checkpoint, "save_model", full)
    before = snapshot(run / "last")
    err = one_line_error(capsys, "train", "--resume", run, "--steps", "30")
    assert "cannot write" in err and "No space left on device" in err
    assert snapshot(run / "last") == before and not temporaries(run)


# ----------------------------------------------------------------------------- two trainers, and Ctrl-C


@pytest.mark.slow
def test_a_run_waits_for_another_preparing_its_data_then_reads_it(tmp_path):
    """Two runs started on the same data: the second waits while the first prepares the folder (output_lock),
    then reads what it wrote instead of writing it again (it used to fail with `cannot write data/...`)."""
    from abcgpt.common import output_lock
    from abcgpt.data import _prepare

    path = write_recipe(tmp_path)
    recipe = load_recipe(str(path))
    code = f"from abcgpt.config import load_recipe; from abcgpt.data import prepared_data; " \
           f"recipe = load_recipe({str(path)!r}); print('ready', flush=True); print(prepared_data(recipe, False).dir)"
    with output_lock(recipe.data_dir):  # the first run, preparing
        second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src")))
        assert second.stdout.readline().strip() == "ready"  # imports done: it asks for the data now
        time.sleep(2)  # preparing this recipe takes a fraction of that
        assert second.poll() is None and not recipe.data_dir.exists()  # waiting, having written nothing
        _prepare(recipe, recipe.data_dir, False)
        written = (recipe.data_dir / "manifest.json").stat().st_mtime_ns
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert Path(out.strip()) == recipe.data_dir
    assert (recipe.data_dir / "manifest.json").stat().st_mtime_ns == written  # read, not written again



def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*ABCGPT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen) -> tuple[int, list[str]]:
    """Ctrl-C: the exit code and the lines abcgpt printed on stderr (a progress bar may be there too)."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    return proc.returncode, [line for line in err.splitlines() if line.startswith("abcgpt: ")]


@pytest.mark.slow
def test_second_trainer_on_a_run_is_refused_naming_the_first(recipe, tmp_path, capsys):
    first = start("train", "--config", recipe, "--out", tmp_path / "run", "--steps", "100000")
    try:
        wait_for(lambda: (tmp_path / "run" / "last").is_dir(), first)  # it holds the run and has saved once
        err = one_line_error(capsys, "train", "--resume", tmp_path / "run", "--steps", "100000")
        assert f"is in use by another abcgpt process (PID {first.pid})" in err
        err = one_line_error(capsys, "calibrate", "--ckpt", tmp_path / "run" / "last", "--samples", "1")
        assert f"PID {first.pid}" in err
    finally:
        code, err = interrupt(first)
    # Ctrl-C: one line, exit 130, and the run resumes where it stopped
    assert code == 130 and len(err) == 1 and err[0].startswith("abcgpt: error: interrupted at step"), err
    assert not temporaries(tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["type"] == "train"]
    assert steps == sorted(set(steps))  # one trainer wrote the log: no step twice
    step = load_checkpoint(tmp_path / "run" / "last").meta.step
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", str(step + 10)]) == 0


def test_ctrl_c_during_a_checkpoint_write_waits_for_it(run, tmp_path, monkeypatch):
    """The interrupt is raised once the checkpoint is whole: never a half-written one, never another error from
    inside the write."""
    import abcgpt.checkpoint as cp

    ckpt, real = load_checkpoint(run / "last"), cp.save_model

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives mid-write
        return real(*args, **kwargs)

    monkeypatch.setattr(cp, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cp.save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.recipe, ckpt.tokenizer, ckpt.sources, 5)
    assert load_checkpoint(tmp_path / "ckpt").meta.step == 5 and not temporaries(tmp_path)


@pytest.mark.slow
def test_sigterm_is_taken_as_ctrl_c_with_exit_143(recipe, tmp_path):
    """SIGTERM (a scheduler, `kill`, a container stopping) killed the run without a word. Now: one line saying at
    which step the run stopped, exit 143, no temporary left, and the run resumes."""
    proc = start("train", "--config", recipe, "--out", tmp_path / "run", "--steps", "100000")
    wait_for(lambda: (tmp_path / "run" / "last").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("abcgpt: ")]
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("abcgpt: error: interrupted at step"), lines
    assert not temporaries(tmp_path / "run")
    step = load_checkpoint(tmp_path / "run" / "last").meta.step
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", str(step + 5)]) == 0

    proc = start("sample", "--ckpt", tmp_path / "run", "--max-new-tokens", "100000")
    proc.stdout.readline()  # generating
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip() == "abcgpt: error: interrupted; nothing was left half-written"


def test_sigterm_during_a_checkpoint_write_waits_for_it(run, tmp_path, monkeypatch):
    """As Ctrl-C: the checkpoint is finished first, then the handler the CLI installs for SIGTERM runs."""
    import abcgpt.checkpoint as cp

    ckpt, real = load_checkpoint(run / "last"), cp.save_model

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
        return real(*args, **kwargs)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        monkeypatch.setattr(cp, "save_model", terminated)
        with pytest.raises(KeyboardInterrupt):
            cp.save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.recipe, ckpt.tokenizer, ckpt.sources, 5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_checkpoint(tmp_path / "ckpt").meta.step == 5 and not temporaries(tmp_path)


@pytest.mark.slow
def test_ctrl_c_in_sample_is_one_line_and_exit_130(run):
    proc = start("sample", "--ckpt", run, "--max-new-tokens", "100000")
    proc.stdout.readline()  # the header: generation has started
    code, err = interrupt(proc)
    assert code == 130 and err == ["abcgpt: error: interrupted; nothing was left half-written"]


@pytest.mark.slow
def test_ctrl_c_in_prepare_leaves_no_half_written_data(tmp_path):
    big = "\n".join(f"line {i} of a large corpus, long enough to take a while to encode" for i in range(400_000))
    (tmp_path / "big.txt").write_text(big)
    (tmp_path / "b.txt").write_text(big.replace("line", "verse"))
    recipe = write_recipe(tmp_path, sources=source_tables(big=tmp_path / "big.txt", other=tmp_path / "b.txt"))
    out = tmp_path / "prepared"
    proc = start("prepare", "--config", recipe, "--out", out)
    wait_for(lambda: list(tmp_path.glob("prepared.*.tmp")), proc)  # mid-write
    code, err = interrupt(proc)
    assert code == 130 and err == ["abcgpt: error: interrupted; nothing was left half-written"], err
    assert not out.exists() and not temporaries(tmp_path)
