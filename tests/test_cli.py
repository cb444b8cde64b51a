import json
import shutil

import pytest
from conftest import source_tables, write_recipe

from abcgpt.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small trained run (two synthetic sources: 'alpha' over a-g, 'omega' over t-z)."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(tmp)
    assert main(["train", "--config", str(recipe), "--out", str(tmp / "run"), "--steps", "120"]) == 0
    return tmp / "run"


def one_line_error(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("abcgpt: error: "), err
    assert "Traceback" not in err
    return err


def test_sample_json_and_dial_positions(run, capsys):
    assert main(["sample", "--ckpt", str(run), "--sweep", "0,1", "-n", "8", "--json", "--seed", "1",
                 "--max-new-tokens", "60", "--prompt", " "]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["dial"] for r in rows] == ["0.00"] * 8 + ["1.00"] * 8
    assert rows[0]["weights"] == {"alpha": 1.0, "omega": 0.0}

    def alpha_share(texts):  # a space is a neutral prompt: both sources start words after it
        a = sum(c in "abcdefg" for t in texts for c in t)
        return a / (a + sum(c in "tuvwxyz" for t in texts for c in t))

    # the dial does its job: mostly alpha's letters at 0, mostly omega's at 1
    assert alpha_share([r["text"] for r in rows[:8]]) > 0.6
    assert alpha_share([r["text"] for r in rows[8:]]) < 0.4


def test_sample_is_reproducible_with_a_seed(run, capsys):
    args = ["sample", "--ckpt", str(run), "--dial", "0.3", "--seed", "7", "--max-new-tokens", "40"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    assert "--- dial 0.30 (alpha 0.70, omega 0.30), mode switch" in first


def test_sweep_prints_side_by_side(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")
    assert main(["sample", "--ckpt", str(run), "--sweep", "0,0.5,1", "--seed", "0", "--max-new-tokens", "50"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "dial 0.00" in header and "dial 0.50" in header and "dial 1.00" in header


def test_mixture_dial_is_normalised_with_a_note(run, capsys):
    assert main(["sample", "--ckpt", str(run), "--dial", "alpha=1,omega=3", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "normalised to alpha=0.25,omega=0.75" in captured.err
    assert "dial 0.75" in captured.out


@pytest.mark.parametrize(
    "dial, msg",
    [("1.5", "outside [0, 1]"), ("nan", "outside [0, 1]"), ("beta=1", "unknown source 'beta'"),
     ("alpha=-1", ">= 0")],
)
def test_bad_dials(run, capsys, dial, msg):
    assert msg in one_line_error(capsys, "sample", "--ckpt", str(run), "--dial", dial)


def test_prompt_outside_vocabulary(run, capsys):
    err = one_line_error(capsys, "sample", "--ckpt", str(run), "--prompt", "héllo")
    assert "'é'" in err and "vocabulary" in err


def test_checkpoint_that_is_not_ours(run, tmp_path, capsys):
    assert "not an abcgpt checkpoint" in one_line_error(capsys, "sample", "--ckpt", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "not an abcgpt checkpoint" in one_line_error(capsys, "sample", "--ckpt", str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    assert "corrupted" in one_line_error(capsys, "sample", "--ckpt", str(tmp_path))
    assert "does not exist" in one_line_error(capsys, "sample", "--ckpt", str(tmp_path / "nope"))


def test_corrupted_checkpoint(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "last", ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    err = one_line_error(capsys, "sample", "--ckpt", str(ckpt))
    assert "model.safetensors does not match its recorded sha256" in err
    shutil.copy(run / "last" / "model.safetensors", ckpt / "model.safetensors")
    (ckpt / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in one_line_error(capsys, "sample", "--ckpt", str(ckpt))


def test_config_errors(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path))
    err = one_line_error(capsys, "train", "--config", recipe, "--out", str(tmp_path / "r"), "--set", "train.lrr=1")
    assert "unknown config key 'train.lrr'" in err
    err = one_line_error(capsys, "train", "--config", recipe, "--out", str(tmp_path / "r"), "--set", "lr=fast")
    assert "train.lr = 'fast' is not allowed: input should be a valid number" in err
    err = one_line_error(capsys, "train", "--config", recipe, "--out", str(tmp_path / "r"), "--set", "gates=maybe")
    assert "model.gates = 'maybe' is not allowed: input should be 'abc' or 'none'" in err
    assert "unknown recipe 'huge'" in one_line_error(capsys, "train", "--config", "huge", "--out", "x")
    (tmp_path / "bad.toml").write_text("[model]\nn_layers = 3\n")
    assert "unknown key model.n_layers" in one_line_error(capsys, "prepare", "--config", str(tmp_path / "bad.toml"))
    (tmp_path / "one.toml").write_text('[[data.sources]]\nname = "shakespeare"\n')
    assert "a dial needs at least two" in one_line_error(capsys, "prepare", "--config", str(tmp_path / "one.toml"))


@pytest.mark.parametrize("content, msg", [(b"", "empty"), (b"caf\xe9 au lait\n" * 50, "UTF-8")])
def test_bad_source_files(tmp_path, capsys, content, msg):
    (tmp_path / "bad.txt").write_bytes(content)
    recipe = write_recipe(tmp_path, sources=source_tables(bad=tmp_path / "bad.txt", ok=tmp_path / "a.txt"))
    err = one_line_error(capsys, "prepare", "--config", str(recipe))
    assert msg in err and "bad.txt" in err


def test_missing_source_and_unknown_builtin(tmp_path, capsys):
    sources = '[[data.sources]]\nname = "x"\npath = "/nonexistent/x.txt"\n[[data.sources]]\nname = "shakespeare"\n'
    assert "/nonexistent/x.txt" in one_line_error(capsys, "prepare", "--config",
                                                  str(write_recipe(tmp_path, sources=sources)))
    sources = '[[data.sources]]\nname = "poems"\n[[data.sources]]\nname = "shakespeare"\n'
    err = one_line_error(capsys, "prepare", "--config", str(write_recipe(tmp_path, sources=sources)))
    assert "unknown built-in source 'poems'" in err and "tinystories" in err


def test_prepare_reports_up_to_date_and_stale(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path))
    assert main(["prepare", "--config", recipe]) == 0
    capsys.readouterr()
    assert main(["prepare", "--config", recipe]) == 0
    assert "up to date" in capsys.readouterr().out
    with open(tmp_path / "b.txt", "a") as f:
        f.write("xyz\n")
    assert main(["prepare", "--config", recipe]) == 0
    assert "text of source 'omega' changed" in capsys.readouterr().out


def test_resume_rejects_other_flags(run, capsys):
    assert "only --steps may change" in one_line_error(capsys, "train", "--resume", str(run), "--set", "lr=1e-4")


def test_info(run, capsys):
    assert main(["info", "--ckpt", str(run)]) == 0
    out = capsys.readouterr().out
    assert "sources       alpha, omega  (dial 0 = alpha, 1 = omega)" in out
    assert "step 120 of 120" in out and "calibration   no" in out
    cfg = json.loads((run / "best" / "config.json").read_text())
    own = cfg["metrics"]["heldout"]["alpha"]["alpha"]
    assert f"alpha {own:.3f}" in out


def test_tensorboard_and_wandb_logs(tmp_path, monkeypatch):
    """train.log_to writes TensorBoard events and an offline Weights & Biases run, with no network."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write_recipe(tmp_path)
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run"), "--steps", "20",
                 "--set", 'train.log_to=["tensorboard", "wandb"]']) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "heldout/alpha at alpha" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_unknown_log_sink(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path))
    err = one_line_error(capsys, "train", "--config", recipe, "--out", str(tmp_path / "r"),
                         "--set", 'train.log_to=["mlflow"]')
    assert "train.log_to.0 = 'mlflow' is not allowed: input should be 'tensorboard' or 'wandb'" in err
