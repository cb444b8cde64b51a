"""Bad input, by class (docs/reliability.md): names that would become paths, values that parse but make no sense.
Each ends in one line `abcgpt: error: ...` (exit 2) or an AbcgptError from the Python API, before any work."""

import json
import math
import os

import pytest
from annotated_types import Ge, Gt, Le, Lt
from conftest import source_tables, train_synthetic, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import abcgpt
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.config import SECTIONS, build_recipe, declared_keys, load_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_synthetic(tmp_path_factory.mktemp("hostile"), "train.steps=20", "train.eval_every=20")


def one_line_error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("abcgpt: error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- class 1: names become paths


@pytest.mark.parametrize("name", ["../../escaped", "../x", "a/b", ".", "..", "", "uniform", "a,b", "a=1", "0.5",
                                  "nan", "x y", "é", "-\n"])
def test_source_names_that_are_not_identifiers_are_refused(tmp_path, capsys, name):
    (tmp_path / "data").mkdir()
    sources = f'[[data.sources]]\nname = {json.dumps(name)}\npath = "{tmp_path / "a.txt"}"\n\n' \
        + source_tables(omega=tmp_path / "b.txt")
    deep = tmp_path / "data" / "one" / "two"
    recipe = write_recipe(tmp_path, sources=sources)
    err = one_line_error(capsys, "prepare", "--config", recipe, "--out", deep)
    assert f"source name {name!r} is not allowed" in err
    # nothing was written: no shards anywhere, no temporary folder
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".tmp") or p.name.endswith(".tmp")]
    assert not deep.exists()


def test_mixed_named_and_bare_dial_is_refused_everywhere(run, capsys):
    err = one_line_error(capsys, "sample", "--ckpt", run, "--dial", "alpha=1,omega", "--max-new-tokens", 2)
    assert "cannot read dial 'alpha=1,omega'" in err
    engine = abcgpt.load(run)
    for dial in ("alpha=1,omega", {"alpha=1,omega": 1.0}, "omega,alpha=1"):
        with pytest.raises(AbcgptError):
            engine.generate("a", dial=dial, max_new_tokens=2)


# ----------------------------------------------------------------------------- class 2: values out of range


@pytest.mark.parametrize("args, says", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-k", "-5"], "top_k must be None or an integer >= 0"),
    (["--seed", "99999999999999999999999"], "seed must be None or an integer in [0, 2**63 - 1]"),
    (["--seed", "-1"], "seed must be None or an integer in [0, 2**63 - 1]"),
    (["-n", "200000", "--json"], "n must be an integer in [1, 1024]"),
    (["-n", "600", "--sweep", "0,1"], "600 x 2 = 1200 sequences"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer in [1,"),
    (["--device", "bogus"], "device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    (["--device", "cuda:7"], "device cuda:7 is not available"),
    (["--mode", "blend"], "argument --mode: invalid choice: 'blend'"),
    (["-n", "many"], "argument -n: invalid int value: 'many'"),
])
def test_sampling_flags_out_of_range(run, capsys, args, says):
    err = one_line_error(capsys, "sample", "--ckpt", run, *args)
    assert says in err
    assert "--- " not in capsys.readouterr().out  # refused before the first sample's header


@pytest.mark.parametrize("command, says", [
    (["calibrate", "--samples", "0"], "--samples = 0 is not allowed: input should be greater than or equal to 1"),
    (["calibrate", "--samples", "5000"], "--samples = 5000 is not allowed"),
    (["calibrate", "--prompt", "\u2603"], "outside the model's"),
    (["eval", "--samples", "0", "--quick"], "--samples = 0 is not allowed"),
    (["serve", "--port", "99999"], "port must be an integer in [0, 65535], got 99999"),
    (["serve", "--max-concurrent", "-1"], "max_concurrent must be an integer >= 1, got -1"),
    (["serve", "--max-new-tokens", "0"], "max_new_tokens"),
    (["serve", "--device", "bogus"], "device must be auto"),
    (["export", "--dial", "0.5", "--out", "{tmp}/x", "--mode", "nonsense"], "invalid choice: 'nonsense'"),
])
def test_command_flags_out_of_range(run, tmp_path, capsys, command, says):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert says in one_line_error(capsys, args[0], "--ckpt", run, *args[1:])
    assert not (run / "report").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, says", [
    ('data.dir="x/{oops}"', "data.dir = 'x/{oops}' is not allowed: the only placeholder it may hold is {recipe}"),
    ("train.beta1=2", "train.beta1 = 2 is not allowed: input should be less than 1"),
    ("train.threads=-1", "train.threads = -1 is not allowed"),
    ('train.device="bogus"', "train.device = 'bogus' is not allowed"),
    ("train.seed=-1", "train.seed = -1 is not allowed"),
    ("train.eval_batches=100000000000", "train.eval_batches = 100000000000 is not allowed"),
    ("train.lr=inf", "train.lr = inf is not allowed: input should be a finite number"),
    ("train.lr=nan", "train.lr = nan is not allowed: input should be a finite number"),
    ("train.weight_decay=-1", "train.weight_decay = -1 is not allowed"),
    ("train.warmup_steps=-5", "train.warmup_steps = -5 is not allowed"),
    ("train.min_lr=1.0", "train.min_lr (1.0) must not be above train.lr"),
    ("model.n_head=5", "model.n_embd (16) must be a multiple of model.n_head (5)"),
    ("model.n_layer=true", "model.n_layer = True is not allowed: input should be a valid integer"),
])
def test_recipe_values_out_of_range_are_refused_before_training(tmp_path, capsys, override, says):
    recipe = write_recipe(tmp_path)
    err = one_line_error(capsys, "train", "--config", recipe, "--out", tmp_path / "r", "--set", override)
    assert says in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "data").exists()


def test_train_steps_zero_is_refused_not_the_full_count(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    err = one_line_error(capsys, "train", "--config", recipe, "--out", tmp_path / "r", "--steps", 0)
    assert "train.steps = 0 is not allowed" in err


def test_unavailable_device_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    err = one_line_error(capsys, "train", "--config", recipe, "--out", tmp_path / "r", "--set", 'train.device="cuda:7"')
    assert "device cuda:7 is not available" in err and not (tmp_path / "r").exists()


def test_resume_to_fewer_steps_is_refused_and_changes_nothing(run, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    err = one_line_error(capsys, "train", "--resume", run, "--steps", 2)
    assert "is at step 20: train.steps = 2 would go back" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert "--steps = 0 is not allowed" in one_line_error(capsys, "train", "--resume", run, "--steps", 0)


@pytest.mark.parametrize("kwargs, says", [
    (dict(seed=2**70), "seed must be None or an integer in [0, 2**63 - 1]"),
    (dict(seed=-1), "seed must be None"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=True), "temperature must be a finite number"),
    (dict(n=10**6), "n must be an integer in [1, 1024]"),
    (dict(max_new_tokens=10**9), "max_new_tokens must be an integer in [1,"),
    (dict(top_k=-1), "top_k must be None or an integer >= 0"),
    (dict(mode="blend"), "unknown dial mode 'blend'"),
])
def test_python_api_raises_abcgpt_error(run, kwargs, says):
    engine = abcgpt.load(run)
    with pytest.raises(AbcgptError) as e:
        engine.generate("a", **({"max_new_tokens": 2} | kwargs))
    assert says in str(e.value)


def test_python_api_checks_devices_and_recipes(run):
    with pytest.raises(AbcgptError, match="device must be"):
        abcgpt.load(run, device="bogus")
    with pytest.raises(AbcgptError, match="train.lr = inf"):
        load_recipe("tiny", ["train.lr=inf"])


# ----------------------------------------------------------------------------- every recipe key, by its declared range


def bounds(info) -> tuple:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    return lo, lo_open, hi, hi_open


NUMERIC = [(section, key, info) for section in SECTIONS for key, info in declared_keys(section).items()
           if info.annotation in (int, float)]


def test_every_numeric_key_declares_both_ends_of_its_range():
    assert len(NUMERIC) >= 30  # the test below must see them all
    for section, key, info in NUMERIC:
        lo, _, hi, _ = bounds(info)
        assert lo is not None and hi is not None, f"{section}.{key} has no declared range"
        assert lo <= info.default <= hi, f"{section}.{key}: its default is outside its range"


def test_config_keys_lists_every_key_with_its_range(capsys):
    assert main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines]
    assert listed == [f"{s}.{k}" for s in SECTIONS for k in declared_keys(s)]
    assert "float >= 0.0 < 1.0" in lines[listed.index("train.beta1")]
    assert "'char' | 'bpe'" in lines[listed.index("data.tokenizer")]


def inside(info):
    lo, lo_open, hi, hi_open = bounds(info)
    if info.annotation is int:
        return st.integers(lo + lo_open, hi - hi_open)
    return st.floats(lo, hi, exclude_min=lo_open, exclude_max=hi_open, allow_nan=False)


def outside(info):
    lo, lo_open, hi, hi_open = bounds(info)
    if info.annotation is int:
        return st.one_of(st.integers(max_value=lo + lo_open - 1), st.integers(min_value=hi - hi_open + 1),
                         st.booleans(), st.floats(allow_nan=True), st.text(max_size=3))
    below = st.floats(max_value=lo, allow_nan=False).filter(lambda v: v <= lo if lo_open else v < lo)
    above = st.floats(min_value=hi, allow_nan=False).filter(lambda v: v >= hi if hi_open else v > hi)
    return st.one_of(below, above, st.just(math.nan), st.just(math.inf), st.booleans(), st.text(max_size=3))


def raw_with(section: str, key: str, value) -> dict:
    """A valid recipe but for one key; keys that other keys constrain get partners that allow any value."""
    raw = {"data": {"sources": ["shakespeare", "tinystories"]}, "model": {"method": "reference"}, "train": {}}
    raw[section][key] = value
    partners = {("model", "n_head"): [("model", "n_embd", value)], ("model", "n_embd"): [("model", "n_head", 1)],
                ("train", "lr"): [("train", "min_lr", 0.0)], ("train", "min_lr"): [("train", "lr", 10.0)],
                ("train", "own_decay_factor"): [("model", "method", "partition"), ("model", "width", "corner")],
                ("train", "branch_step"): [("model", "method", "partition"), ("model", "width", "corner")]}
    for s, k, v in partners.get((section, key), []):
        raw[s][k] = v
    return raw


@pytest.mark.parametrize("section, key, info", NUMERIC, ids=[f"{s}.{k}" for s, k, _ in NUMERIC])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_recipe_key_inside_its_range_is_taken_as_given(section, key, info, data):
    value = data.draw(inside(info))
    r = build_recipe(raw_with(section, key, value), "prop")
    assert getattr(getattr(r, section), key) == value


@pytest.mark.parametrize("section, key, info", NUMERIC, ids=[f"{s}.{k}" for s, k, _ in NUMERIC])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_recipe_key_outside_its_range_is_refused_naming_it(section, key, info, data):
    value = data.draw(outside(info))
    with pytest.raises(AbcgptError) as e:
        build_recipe(raw_with(section, key, value), "prop")
    message = str(e.value)
    assert message.startswith(f"{section}.{key} = ") and "is not allowed" in message and "\n" not in message


# ----------------------------------------------------------------------------- what a path is, and how much is read


def test_special_files_are_named_as_such(tmp_path, capsys):
    """A FIFO or a device given as a corpus, a recipe or a checkpoint is named for what it is (it was "does not
    exist" for some), and never opened: a FIFO would block the read forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "is a FIFO (named pipe)" in one_line_error(capsys, "sample", "--ckpt", fifo)
    os.mkfifo(tmp_path / "recipe.toml")
    assert "is a FIFO (named pipe)" in one_line_error(capsys, "config", "--config", tmp_path / "recipe.toml")
    assert "is a character device" in one_line_error(capsys, "sample", "--ckpt", "/dev/null")
    recipe = write_recipe(tmp_path, sources=source_tables(alpha=fifo, omega=tmp_path / "b.txt"))
    err = one_line_error(capsys, "prepare", "--config", recipe)
    assert "source 'alpha'" in err and "is a FIFO (named pipe)" in err


def test_a_huge_max_bytes_reads_only_what_the_file_holds(tmp_path):
    """max_bytes = 100_000_000_000 gave MemoryError: the read reserved the full size before reading."""
    from abcgpt.sources import _read_bytes

    (tmp_path / "a.txt").write_bytes(b"x" * 3_000_000)
    assert _read_bytes(tmp_path / "a.txt", 100_000_000_000) == b"x" * 3_000_000
    assert _read_bytes(tmp_path / "a.txt", 2_500_000) == b"x" * 2_500_000
    recipe = write_recipe(tmp_path, sources=source_tables(alpha=tmp_path / "a.txt", omega=tmp_path / "a.txt"))
    text = recipe.read_text().replace('path = "', 'max_bytes = 100_000_000_000\npath = "')
    recipe.write_text(text)
    assert main(["prepare", "--config", str(recipe)]) == 0


def test_an_empty_sweep_is_refused(run, capsys):
    """`sample --sweep ''` printed one sample at the default dial, as if no sweep was asked for."""
    for sweep in ("", ",", "0,,1", " "):
        assert "has an empty position" in one_line_error(capsys, "sample", "--ckpt", run, "--sweep", sweep)
