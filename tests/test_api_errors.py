"""The Python API refuses every bad argument with a one-line AbcgptError, never another exception, and with the
message `abcgpt sample` prints for the same bad value."""

import inspect
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import train_synthetic
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import abcgpt
from abcgpt.checkpoint import load_checkpoint
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.engine import Engine


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (two synthetic sources: 'alpha' over a-g, 'omega' over t-z)."""
    return train_synthetic(tmp_path_factory.mktemp("api_errors"), "train.steps=10", "train.eval_every=10")


@pytest.fixture(scope="module")
def m(run_dir) -> Engine:
    return abcgpt.load(run_dir, device="cpu")


# Wrong types, non-finite and out-of-range numbers, unknown names. The integers and floats are each wrong for every
# numeric argument or cheap when right (a seed of 0, a temperature of 1e308), so no draw starts a long generation.
BAD = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, 0, 2**63, -(2**63) - 1, 10**30]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.5, 1e308]),
    st.sampled_from(["", "gamma", "alpha=-1", "beta=1", "alpha=1,omega", "uniform", "alpha", "1.5", "Q", "switch"]),
    st.text(max_size=6), st.binary(max_size=4), st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.sampled_from(["alpha", "omega", "beta", ""]), st.integers(-1, 2), max_size=2),
    st.just(object()), st.just(threading.Event()),
)
GOOD = {"prompt": " ", "text": "abc fed", "dial": "omega", "spec": 0.5, "dials": [0.0, "omega"], "max_new_tokens": 2,
        "temperature": 0.8, "top_k": 40, "seed": 0, "n": 1, "calibrated": False, "mode": None, "notes": None,
        "stop": None, "positions": 1, "x": torch.tensor([[1, 2, 3]]), "y": torch.tensor([[2, 3, 4]]),
        "ids": torch.tensor([[1, 2, 3]])}
# every public method of the engine that takes arguments, and the arguments each takes
METHODS = {name: [p for p in inspect.signature(f).parameters if p != "self"]
           for name, f in inspect.getmembers(Engine, inspect.isfunction)
           if not name.startswith("_") and len(inspect.signature(f).parameters) > 1}


def test_every_public_method_is_covered():
    assert set(METHODS) == {"attribute", "check_sampling", "dial", "dial_tensor", "generate", "logprobs", "loss",
                            "mode", "network", "posteriors", "prompt_ids", "stream", "sweep"}
    assert all(p in GOOD for params in METHODS.values() for p in params)


def refused_in_one_line(call, *args, **kwargs) -> str | None:
    """Call (and run any iterator it returns to the end): None if it works, else its AbcgptError's message, which must
    be one line. Any other exception fails the test."""
    try:
        out = call(*args, **kwargs)
        if isinstance(out, Iterator):
            list(out)
    except AbcgptError as e:
        message = str(e)
        assert message and "\n" not in message, message
        return message
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(METHODS)), data=st.data())
def test_bad_arguments_to_any_method_are_one_abcgpt_error(m, name, data):
    params = METHODS[name]
    bad = {data.draw(st.sampled_from(params), label="bad")} | data.draw(st.sets(st.sampled_from(params)), label="also")
    kwargs = {p: data.draw(BAD, label=p) if p in bad else GOOD[p] for p in params}
    refused_in_one_line(getattr(m, name), **kwargs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=BAD | st.sampled_from(["nope", ".", "/", "/dev/null", "/proc/self/mem", "\x00"]),
       device=BAD | st.sampled_from(["cpu", "auto", "cuda:7", "tpu"]))
@example(run=None, device="cpu")  # was: TypeError from pathlib
def test_bad_arguments_to_load_and_engine_are_one_abcgpt_error(run, device):
    assert refused_in_one_line(abcgpt.load, run, device) is not None
    assert refused_in_one_line(Engine, run) is not None


def test_a_path_too_long_for_the_system():
    assert refused_in_one_line(abcgpt.load, "a" * 5000, "cpu") is not None


def test_good_arguments_still_work(m, run_dir):
    """The checks refuse nothing the API took before: every method with GOOD arguments, dials as tensors too."""
    for name, params in METHODS.items():
        assert refused_in_one_line(getattr(m, name), **{p: GOOD[p] for p in params}) is None, name
    assert len(m.logprobs(GOOD["x"], GOOD["y"], [torch.tensor([0.2, 0.8]), "alpha"], "mixture")) == 2
    assert m.sweep(" ", (torch.tensor([1.0, 0.0]),), max_new_tokens=2, stop=threading.Event())
    assert Engine(load_checkpoint(run_dir)).sources == ["alpha", "omega"]


def cli_error(capsys, run_dir, *args) -> str:
    """What `abcgpt sample` prints for these arguments, less its 'abcgpt: error: ' prefix."""
    code = main(["sample", "--ckpt", str(run_dir), "--prompt", " ", "--max-new-tokens", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("abcgpt: error: ") and len(err.splitlines()) == 1, err
    return err.removeprefix("abcgpt: error: ")


@pytest.mark.parametrize("args, kwargs", [
    (["--dial", "1.5"], {"dial": 1.5}),
    (["--dial", "nan"], {"dial": math.nan}),
    (["--dial", "beta=1"], {"dial": {"beta": 1}}),
    (["--dial", "alpha=-1"], {"dial": {"alpha": -1.0}}),
    (["-n", "0"], {"n": 0}),
    (["--max-new-tokens", "-1"], {"max_new_tokens": -1}),
    (["--temperature", "-1"], {"temperature": -1.0}),
    (["--temperature", "inf"], {"temperature": math.inf}),
    (["--top-k", "-1"], {"top_k": -1}),
    (["--seed", str(2**63)], {"seed": 2**63}),
    (["--prompt", "héllo"], {"prompt": "héllo"}),
    (["--calibrated"], {"calibrated": True}),
])
def test_the_api_says_what_the_cli_says(m, run_dir, capsys, args, kwargs):
    with pytest.raises(AbcgptError) as e:
        m.generate(**{"prompt": " ", "max_new_tokens": 2, **kwargs})
    assert str(e.value) == cli_error(capsys, run_dir, *args)


def test_load_and_sweep_say_what_the_cli_says(m, run_dir, tmp_path, capsys):
    with pytest.raises(AbcgptError) as e:
        m.sweep(" ", [0, 2], max_new_tokens=2)
    assert str(e.value) == cli_error(capsys, run_dir, "--sweep", "0,2")
    with pytest.raises(AbcgptError) as e:
        abcgpt.load(run_dir, device="tpu")
    assert str(e.value) == cli_error(capsys, run_dir, "--device", "tpu")
    with pytest.raises(AbcgptError) as e:
        abcgpt.load(tmp_path / "nope")
    assert str(e.value) == cli_error(capsys, tmp_path / "nope")
