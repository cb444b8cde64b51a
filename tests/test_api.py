import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_recipe

from abcgpt.api import load
from abcgpt.checkpoint import Calibration
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.engine import Engine
from abcgpt.train import train

ALPHA, OMEGA = set("abcdefg"), set("tuvwxyz")
ALPHA_TEXT = "abc fed gab cage bead\nfade ace bad dag gef"
OMEGA_TEXT = "tux wyz vut zyx tuv\nwxy zut yut vux wzt"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("api")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=80"]), tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def m(run_dir) -> Engine:
    return load(run_dir, device="cpu")


def test_load_run_dir_and_sources(m, run_dir):
    assert m.sources == ["alpha", "omega"]
    assert m.path.parent == run_dir  # the run's best (or last) checkpoint
    assert m.model is not None and m.tokenizer is not None and m.meta.sources == m.sources
    r = repr(m)
    assert "alpha" in r and "omega" in r and "step=" in r and "params=" in r


def test_load_errors(tmp_path):
    with pytest.raises(AbcgptError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(AbcgptError, match="not an abcgpt checkpoint"):
        load(tmp_path)


def test_dial_specs(m):
    assert m.dial(0) == {"alpha": 1.0, "omega": 0.0}
    assert m.dial(0.25) == {"alpha": 0.75, "omega": 0.25}
    assert m.dial("omega") == {"alpha": 0.0, "omega": 1.0}
    assert m.dial("uniform") == {"alpha": 0.5, "omega": 0.5}
    assert m.dial("alpha=1,omega=3") == {"alpha": 0.25, "omega": 0.75}
    assert m.dial({"alpha": 2, "omega": 2}) == {"alpha": 0.5, "omega": 0.5}
    assert m.dial([3, 1]) == {"alpha": 0.75, "omega": 0.25}


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "gamma", "alpha=x", "alpha=0,omega=0", {"gamma": 1},
                                 {"alpha": "x"}, {}, [1, 2, 3], True, None, object()])
def test_bad_dial_raises(m, bad):
    with pytest.raises(AbcgptError):
        m.dial(bad)
    with pytest.raises(AbcgptError):
        m.generate(" ", dial=bad, max_new_tokens=2)


def test_generate_returns_str_or_list(m):
    s = m.generate(" ", dial=0.5, max_new_tokens=10, seed=0)
    assert isinstance(s, str) and len(s) == 10  # char tokenizer: one character per token
    many = m.generate(" ", dial=0.5, max_new_tokens=10, seed=0, n=3)
    assert isinstance(many, list) and len(many) == 3 and all(isinstance(t, str) and len(t) == 10 for t in many)
    assert isinstance(m.generate(max_new_tokens=5, seed=0), str)  # empty prompt: starts from a line break


def test_seed_reproducible(m):
    a = m.generate(" ", dial=0.3, max_new_tokens=30, seed=7)
    assert a == m.generate(" ", dial=0.3, max_new_tokens=30, seed=7)
    assert a != m.generate(" ", dial=0.3, max_new_tokens=30, seed=8)


def test_dial_changes_output(m):
    def share(dial) -> float:
        text = "".join(m.generate(" ", dial=dial, max_new_tokens=80, seed=0, n=16))
        alpha, omega = sum(c in ALPHA for c in text), sum(c in OMEGA for c in text)
        return alpha / max(1, alpha + omega)

    low, high = share(0.0), share(1.0)
    assert low > 0.55 > 0.45 > high and low > high + 0.25  # 0.5: no preference
    # the same dial, spelled differently, gives the same samples
    assert share("alpha") == low and share({"omega": 1}) == high


def test_stream_joins_to_generate(m):
    pieces = list(m.stream(" ", dial=0.4, max_new_tokens=25, seed=3))
    assert len(pieces) > 1
    assert "".join(pieces) == m.generate(" ", dial=0.4, max_new_tokens=25, seed=3)


def test_loss_follows_dial(m):
    assert m.loss(ALPHA_TEXT, dial=0) < m.loss(ALPHA_TEXT, dial=1)
    assert m.loss(OMEGA_TEXT, dial=1) < m.loss(OMEGA_TEXT, dial=0)


def test_loss_equals_model_loss(m):
    """In mode gates the loss is the gated network's at the dial; in mode mixture it is the posterior mixture of the
    corners: -log(sum_k a_k p_k(text)) per predicted token."""
    text = "abc fed\ntux"
    ids = torch.tensor([m.tokenizer.encode(text)])
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        _, expected = m.model(x, torch.tensor([0.7, 0.3]), targets=y)
        corner_logp = [-m.model(x, torch.tensor(c), targets=y)[1] * y.numel() for c in ([1.0, 0.0], [0.0, 1.0])]
    assert m.loss(text, dial=0.3, mode="gates") == pytest.approx(expected.item(), rel=1e-5)
    mixture = -torch.logsumexp(torch.stack(corner_logp) + torch.tensor([0.7, 0.3]).log(), 0) / y.numel()
    assert m.default_mode == "switch"
    assert m.loss(text, dial=0.3, mode="mixture") == pytest.approx(mixture.item(), rel=1e-5)


def test_loss_long_text_in_windows(m):
    block = m.model.config.block_size
    text = (ALPHA_TEXT + "\n") * 3
    ids = torch.tensor(m.tokenizer.encode(text))
    assert len(ids) > 2 * block
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, block):
            chunk = ids[s:s + block + 1][None]
            _, loss = m.model(chunk[:, :-1], torch.tensor([1.0, 0.0]), targets=chunk[:, 1:])
            total += loss.item() * (chunk.size(1) - 1)
            count += chunk.size(1) - 1
    assert count == len(ids) - 1
    assert m.loss(text, dial=0) == pytest.approx(total / count, rel=1e-5)


def test_loss_needs_two_tokens(m):
    with pytest.raises(AbcgptError, match="at least 2 tokens"):
        m.loss("a")


def test_unknown_characters_raise(m):
    with pytest.raises(AbcgptError, match="outside"):
        m.loss("abc QQQ", dial=0)
    with pytest.raises(AbcgptError, match="outside"):
        m.generate("Q", max_new_tokens=2)
    with pytest.raises(AbcgptError, match="outside"):
        m.stream("Q", max_new_tokens=2)  # raised at the call, not at the first piece


def test_calibrated_without_calibration_raises(m):
    assert m.calibration is None
    with pytest.raises(AbcgptError, match="no calibration"):
        m.generate(" ", dial=0.5, calibrated=True, max_new_tokens=2)
    with pytest.raises(AbcgptError, match="no calibration"):
        m.dial(0.5, calibrated=True)


def test_calibrated_maps_share_to_dial(m):
    m.meta.calibration = Calibration(share=[0.0, 1.0], dial=[0.2, 0.6], mode="switch")
    try:
        assert m.dial(0.5, calibrated=True) == pytest.approx({"alpha": 0.6, "omega": 0.4})
        with pytest.raises(AbcgptError):
            m.dial("omega", calibrated=True)
    finally:
        m.meta.calibration = None


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=-2)])
def test_bad_sampling_arguments(m, kwargs):
    with pytest.raises(AbcgptError):
        m.generate(" ", **kwargs)


@pytest.mark.slow
def test_example_script_runs(run_dir):
    r = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), str(run_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "alpha" in r.stdout and "omega" in r.stdout and "loss" in r.stdout
