"""The inference engine (engine.py) and the dial maths between the corners (dial.py): every surface (Python API,
`abcgpt sample`, the HTTP server, export) goes through one Engine, so the same prompt, dial, mode and seed must
give the same text everywhere, and what each mode means must hold exactly (the mixture telescopes, switch restarts
at boundaries, a corner is a corner in every mode). One tiny model is trained for the module (~10 s on a thread)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import train_synthetic
from fastapi.testclient import TestClient

import abcgpt
from abcgpt.checkpoint import Calibration, load_checkpoint
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.dial import (
    MIN_TURN_CHARS,
    MODES,
    combine_next,
    combine_scores,
    corner,
    next_segment_source,
    systematic_draw,
    turn_ends,
    update_weights,
)
from abcgpt.engine import Engine
from abcgpt.model import SubNetwork
from abcgpt.serve import create_app
from abcgpt.tokenizer import CharTokenizer

ALPHA, OMEGA = set("abcdefg"), set("tuvwxyz")
PROMPT = "fed cab\ntu"  # both alphabets and a line break (a boundary for switch)
TEXT = "abc fed\ntux wyz"  # 15 characters: 14 predictions, within block_size 16, one line break among the targets


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # 250 steps: enough for each corner to write its own alphabet at low temperature (at 150 that hung on the
    # batches drawn: one draw of windows left a corner not there yet)
    return train_synthetic(tmp_path_factory.mktemp("engine"), "train.steps=250", "train.eval_every=250")


@pytest.fixture(scope="module")
def engine(run) -> Engine:
    return abcgpt.load(run, device="cpu")


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    return TestClient(create_app(run, device="cpu"))


def spy_rows(engine: Engine, monkeypatch) -> list[torch.Tensor]:
    """Record the per-row dials that mixture hands to the decoder: one one-hot corner per sample."""
    seen, orig = [], engine._decode_rows

    def spy(ids, dials, *args, **kw):
        seen.append(dials.detach().clone())
        return orig(ids, dials, *args, **kw)

    monkeypatch.setattr(engine, "_decode_rows", spy)
    return seen


def corner_logprobs(engine: Engine, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y (1, T) and, computed by hand from the *gated* model at each corner (not the engine's folded copies),
    the full next-token log-softmax (K, T, V) and the targets' log-probs (K, T)."""
    ids = torch.tensor([engine.tokenizer.encode(text)])
    x, y = ids[:, :-1], ids[:, 1:]
    full = []
    with torch.no_grad():
        for k in range(len(engine.sources)):
            logits, _ = engine.model(x, corner(k, len(engine.sources)), targets=y)
            full.append(torch.log_softmax(logits[0].float(), dim=-1))
    full = torch.stack(full)
    return x, y, full, full.gather(-1, y[0][None, :, None].expand(len(full), -1, 1)).squeeze(-1)


# ----------------------------------------------------------------------------- one text on every surface


@pytest.mark.parametrize("mode", ["mixture", "switch", "tokens"])
def test_same_text_on_every_surface(engine, run, client, capsys, mode):
    """The engine's promise: the Python API, `abcgpt sample --json` (a batch), plain `abcgpt sample` (the streamed
    single sample) and HTTP /api/generate give the same text for the same prompt, dial, mode and seed, with each
    surface's own defaults for temperature (0.8) and top-k (40). A surface that drifted (another default, another
    random stream, a mode not passed on) would show here."""
    n_new, seed = 30, 5
    api = engine.generate(PROMPT, dial=0.3, max_new_tokens=n_new, seed=seed, mode=mode)
    assert isinstance(api, str) and len(api) == n_new  # char tokenizer: one character per token

    common = ["sample", "--ckpt", str(run), "--dial", "0.3", "--mode", mode, "--seed", str(seed), "--prompt", PROMPT,
              "--max-new-tokens", str(n_new), "--device", "cpu"]
    assert main(common + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1
    assert rows[0]["text"] == api and rows[0]["mode"] == mode and rows[0]["dial"] == "0.30"

    assert main(common) == 0
    header, body = capsys.readouterr().out.split("\n", 1)
    assert header.startswith("--- dial 0.30") and f"mode {mode}" in header
    assert body == PROMPT + api + "\n"

    r = client.post("/api/generate", json={"prompt": PROMPT, "dial": 0.3, "mode": mode, "seed": seed,
                                           "max_new_tokens": n_new, "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == api and r.json()["mode"] == mode


def test_the_mode_changes_the_text(engine):
    """Guards the test above: were a mode's text the default's (switch), a surface that ignored --mode would pass
    it. (Here mixture and switch agree: this model's lines are shorter than a turn, so switch never hands over.)"""
    kw = dict(dial=0.3, max_new_tokens=30, seed=5)
    assert engine.generate(PROMPT, mode="tokens", **kw) != engine.generate(PROMPT, mode="switch", **kw)


@pytest.mark.parametrize("mode", MODES)
def test_stream_joins_to_generate_in_every_mode(engine, mode):
    """stream and generate are two entry points into one decoder: their texts agree in every mode."""
    kw = dict(dial=0.4, max_new_tokens=20, seed=11, mode=mode)
    assert "".join(engine.stream(PROMPT, **kw)) == engine.generate(PROMPT, **kw)


# ----------------------------------------------------------------------------- randomness


def _global_rng_untouched(call) -> bool:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    call()
    return torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mode", MODES)
def test_seedless_generation_leaves_global_rng_alone(engine, mode):
    """A server or notebook that seeds torch for its own work must not see its stream moved by a generation:
    a seedless call uses a private generator (mixture draws its corners from it too). The networks are folded
    once first; the next test covers a first call, which folds."""
    engine.generate(PROMPT, dial=0.3, max_new_tokens=1, seed=0, mode=mode)  # warm the folded-network cache

    def call():
        engine.generate(PROMPT, dial=0.3, max_new_tokens=5, seed=None, mode=mode, n=4)
        "".join(engine.stream(PROMPT, dial=0.3, max_new_tokens=5, seed=None, mode=mode))

    assert _global_rng_untouched(call)


@pytest.mark.parametrize("mode", ["gates", "mixture", "switch"])
def test_first_generation_at_a_dial_leaves_global_rng_alone(engine, mode):
    """The same promise on a fresh engine, whose folded-network cache is empty (a server's first request)."""
    fresh = Engine(engine.checkpoint)
    assert _global_rng_untouched(lambda: fresh.generate(PROMPT, dial=0.3, max_new_tokens=2, seed=None, mode=mode))


def test_seedless_generations_differ(engine):
    """...and seed=None really is random (not a fixed hidden seed)."""
    a = engine.generate(" ", dial=0.5, max_new_tokens=40, seed=None)
    b = engine.generate(" ", dial=0.5, max_new_tokens=40, seed=None)
    assert a != b


# ----------------------------------------------------------------------------- the maths between the corners


def _random_case(seed: int, B: int = 3, K: int = 3, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lp = torch.rand(B, K, T, generator=g, dtype=torch.float64).clamp_min(1e-6).log()  # any log-probs
    a = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((B,))
    return lp, a.log()


@pytest.mark.parametrize("seed", range(3))
def test_mixture_scores_telescope(seed):
    """mixture is Bayes' rule token by token, so the log-probs of a text add up to the log of the whole-text
    mixture sum_k a_k p_k(text); its regret against any source s is therefore at most -log(a_s) per text."""
    lp, log_a = _random_case(seed)
    total = combine_scores(lp, log_a, "mixture").sum(-1)
    expected = torch.logsumexp(log_a + lp.sum(-1), dim=1)
    torch.testing.assert_close(total, expected)
    regret = lp.sum(-1) - total[:, None]  # (B, K): how much worse than corner s alone
    assert (regret <= -log_a + 1e-9).all()


@pytest.mark.parametrize("seed", range(3))
def test_tokens_is_the_per_token_mixture(seed):
    """tokens never learns: every token is scored by the fixed mixture sum_k a_k p_k(token)."""
    lp, log_a = _random_case(seed)
    torch.testing.assert_close(combine_scores(lp, log_a, "tokens"), torch.logsumexp(log_a[..., None] + lp, dim=1))


def test_switch_restarts_the_mixture_at_a_boundary():
    """switch is the mixture run sentence by sentence: a boundary at token j splits the text into two texts,
    each scored as a fresh mixture from the dial. Without boundaries it is the mixture; with a boundary after
    every token it is tokens."""
    lp, log_a = _random_case(7, T=9)
    j = 3
    boundary = torch.zeros(lp.size(0), lp.size(-1), dtype=torch.bool)
    boundary[:, j] = True
    out = combine_scores(lp, log_a, "switch", boundary)
    torch.testing.assert_close(out[:, :j + 1], combine_scores(lp[..., :j + 1], log_a, "mixture"))
    torch.testing.assert_close(out[:, j + 1:], combine_scores(lp[..., j + 1:], log_a, "mixture"))
    torch.testing.assert_close(combine_scores(lp, log_a, "switch", torch.zeros_like(boundary)),
                               combine_scores(lp, log_a, "mixture"))
    torch.testing.assert_close(combine_scores(lp, log_a, "switch", torch.ones_like(boundary)),
                               combine_scores(lp, log_a, "tokens"))


def test_combine_next_per_mode():
    """Next-token distributions: mixture/switch/tokens mix probabilities with the weights, product multiplies
    them (p ~ prod p_k^a_k), renormalised. Both are proper distributions."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, 11, generator=g, dtype=torch.float64), dim=-1)
    log_w = torch.log_softmax(torch.randn(2, 3, generator=g, dtype=torch.float64), dim=-1)
    w, p = log_w.exp(), logp.exp()
    for mode in ("mixture", "switch", "tokens"):
        torch.testing.assert_close(combine_next(logp, log_w, mode).exp(), (w[..., None] * p).sum(1))
    prod = (p ** w[..., None]).prod(1)
    torch.testing.assert_close(combine_next(logp, log_w, "product").exp(), prod / prod.sum(-1, keepdim=True))
    for mode in ("mixture", "product"):
        torch.testing.assert_close(combine_next(logp, log_w, mode).logsumexp(-1), torch.zeros(2, dtype=torch.float64))


def test_update_weights_per_mode():
    """mixture: the posterior after a token; switch: the same, except that a row whose token was a boundary goes
    back to the dial exactly; tokens and product: the weights never move."""
    g = torch.Generator().manual_seed(1)
    log_a = torch.log_softmax(torch.randn(3, 2, generator=g), dim=-1)
    log_w = torch.log_softmax(torch.randn(3, 2, generator=g), dim=-1)
    seen = torch.log_softmax(torch.randn(3, 5, generator=g), dim=-1)[:, :2]
    post = update_weights(log_w, seen, "mixture", log_a)
    torch.testing.assert_close(post.exp(), (log_w + seen).exp() / (log_w + seen).exp().sum(1, keepdim=True))
    boundary = torch.tensor([True, False, True])
    sw = update_weights(log_w, seen, "switch", log_a, boundary)
    assert torch.equal(sw[boundary], log_a[boundary])
    assert torch.equal(sw[~boundary], post[~boundary])
    assert torch.equal(update_weights(log_w, seen, "switch", log_a, None), post)
    for mode in ("tokens", "product"):
        assert torch.equal(update_weights(log_w, seen, mode, log_a, boundary), log_w)


def test_boundaries_of_the_char_model(engine):
    """switch may change source only after a line or sentence end. In this model's vocabulary (letters, space,
    newline) only the newline is one."""
    flags = engine._boundaries()
    assert flags.shape == (engine.model.config.vocab_size,)
    marked = {engine.tokenizer.decode([i]) for i in flags.nonzero().flatten().tolist()}
    assert marked == {"\n"}


def test_boundaries_mark_sentence_ends(engine):
    """With punctuation in the vocabulary, '.', '!' and '?' end a sentence; letters and the space do not; ids past
    the tokenizer's vocabulary (padding) are never boundaries."""
    eng = Engine(engine.checkpoint)
    chars = list("\n !.?abz")
    eng.tokenizer = CharTokenizer(chars)
    flags = eng._boundaries().tolist()
    assert flags[:len(chars)] == [c in "\n.!?" for c in chars]
    assert not any(flags[len(chars):])


# ----------------------------------------------------------------------------- scoring through the engine


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 1])
def test_logprobs_at_a_corner_are_the_corner(engine, mode, k):
    """At a corner every mode is that corner's network: the engine's scores equal the gated model's at the
    corner (computed here without the engine's folded copies)."""
    x, y, _, lp = corner_logprobs(engine, TEXT)
    (got,) = engine.logprobs(x, y, [corner(k, 2)], mode)
    torch.testing.assert_close(got[0], lp[k], atol=1e-5, rtol=1e-5)
    assert engine.loss(TEXT, dial=engine.sources[k], mode=mode) == pytest.approx(-float(lp[k].mean()), rel=1e-5)


def test_logprobs_between_corners_by_hand(engine):
    """Each combining mode's score of a real text at dial 0.3, from the corners' log-probs by hand: mixture sums
    to log sum_k a_k p_k(text); tokens is the per-token mixture; switch is the mixture restarted after each turn
    (here none: the line break ends a line of 7 characters, shorter than a turn; a restart at a turn's end is tested
    with combine_scores); product is log_softmax(sum_k a_k logp_k). All four come from one engine.logprobs call."""
    x, y, full, lp = corner_logprobs(engine, TEXT)
    a = torch.tensor([0.7, 0.3])
    log_a = a.log()[:, None]
    mixture, switch, tokens, product = (engine.logprobs(x, y, [a], m)[0][0] for m in
                                        ("mixture", "switch", "tokens", "product"))
    torch.testing.assert_close(mixture.sum(), torch.logsumexp(log_a[:, 0] + lp.sum(-1), 0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(tokens, torch.logsumexp(log_a + lp, 0), atol=1e-5, rtol=1e-5)
    assert engine._boundaries()[y].any() and not engine._turn_ends(y).any()
    torch.testing.assert_close(switch, mixture, atol=1e-5, rtol=1e-5)
    by_hand = torch.log_softmax((a[:, None, None] * full).sum(0), dim=-1).gather(-1, y[0][:, None]).squeeze(-1)
    torch.testing.assert_close(product, by_hand, atol=1e-5, rtol=1e-5)
    # the regret bound on a real text: the mixture never loses more than -log(a_s) to either corner
    assert all(float(lp[s].sum() - mixture.sum()) <= -math.log(float(a[s])) + 1e-4 for s in range(2))


# ----------------------------------------------------------------------------- systematic sampling


def _weights(seed: int, G: int = 64, K: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(G, K, generator=g)
    w[torch.rand(G, K, generator=g) < 0.3] = 0.0  # zeros anywhere: first, middle, last
    w[w.sum(1) == 0, 0] = 1.0
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_systematic_draw_counts_follow_the_weights(n):
    """n draws hold corner k n * w_k times, within one: a batch of 8 samples at dial 0.25 shows 2 of the second
    source, not a coin's luck. And a zero weight is never drawn, also at the edge offset u = 0."""
    w = _weights(n)
    for u in (torch.rand(len(w), generator=torch.Generator().manual_seed(n)), torch.zeros(len(w))):
        ks = systematic_draw(w, n, u)
        assert ks.shape == (len(w), n)
        counts = torch.nn.functional.one_hot(ks, w.size(1)).sum(1).float()
        assert ((counts - n * w).abs() <= 1 + 1e-5).all()
        assert (counts[w == 0] == 0).all()


def test_systematic_draw_marginal_matches_the_weights():
    """Over many offsets u, one draw (n = 1), and a draw at a uniformly chosen position among n, is corner k with
    probability w_k: mixture's samples are the dial's mixture, not biased toward either end."""
    w = torch.tensor([[0.1, 0.0, 0.25, 0.65]])
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    single = systematic_draw(w.expand(len(u), -1), 1, u)[:, 0]
    torch.testing.assert_close(torch.bincount(single, minlength=4) / len(u), w[0], atol=0.015, rtol=0)
    eight = systematic_draw(w.expand(len(u), -1), 8, u).flatten()
    torch.testing.assert_close(torch.bincount(eight, minlength=4) / len(eight), w[0], atol=0.015, rtol=0)


def test_systematic_draw_never_draws_a_zero_weight_near_u_1():
    """torch.rand can return 1 - 2**-24; with n = 8 the last point (7 + u) / 8 is 1.0 in float32."""
    u = torch.tensor([1 - 2**-24])
    assert systematic_draw(torch.tensor([[1.0, 0.0]]), 8, u).max() == 0  # dial at alpha: never omega
    assert systematic_draw(torch.tensor([[0.5, 0.5, 0.0]]), 8, u).max() <= 1


# ----------------------------------------------------------------------------- mixture generation


def test_mixture_batch_shows_the_dial_share(engine, monkeypatch):
    """mixture at dial 0.25 with n = 8: exactly 2 samples are drawn from the omega corner, 6 from alpha, for any
    seed (systematic sampling); sweep draws each dial's group on its own; a prompt in one alphabet moves the
    posterior to that source."""
    rows = spy_rows(engine, monkeypatch)
    for seed in range(20):
        engine.generate("", dial=0.25, n=8, max_new_tokens=1, seed=seed, mode="mixture")
        assert rows[-1].sum(0).tolist() == [6.0, 2.0]
        assert ((rows[-1] == 0) | (rows[-1] == 1)).all()  # each sample is one corner's
    engine.sweep("", [0.25, 0.75], n=4, max_new_tokens=1, seed=0, mode="mixture")
    assert rows[-1][:4].sum(0).tolist() == [3.0, 1.0] and rows[-1][4:].sum(0).tolist() == [1.0, 3.0]
    engine.generate("tux wyz vut zyx", dial=0.25, n=8, max_new_tokens=1, seed=0, mode="mixture")
    assert rows[-1].sum(0).tolist() == [0.0, 8.0]
    engine.generate("abc fed gab cag", dial=0.75, n=8, max_new_tokens=1, seed=0, mode="mixture")
    assert rows[-1].sum(0).tolist() == [8.0, 0.0]


@pytest.mark.parametrize("seed", range(3))
def test_mixture_samples_are_written_by_their_corner(engine, seed):
    """The same, read off the text: the sources are told apart by alphabet, and at dial 0.25 exactly 2 of 8
    samples are written in omega's letters. Temperature 0.3 keeps this tiny model's corners pure (at 0.8 a corner
    sometimes wanders into the other alphabet)."""
    texts = engine.generate("", dial=0.25, n=8, max_new_tokens=24, seed=seed, mode="mixture", temperature=0.3)
    counts = [(sum(c in ALPHA for c in t), sum(c in OMEGA for c in t)) for t in texts]
    assert all(a + o >= 5 for a, o in counts), counts  # enough letters to judge each sample
    assert sum(o > a for a, o in counts) == 2, counts


def test_mixture_sample_position_does_not_fix_its_corner(engine, monkeypatch):
    """Each sample of a batch should be distributed as the dial's mixture (the engine's docstring): at dial 0.5
    with n = 2, the first sample should be omega about half the time over seeds; unshuffled systematic draws made
    it never omega (/v1/completions choices[0] was always the first source)."""
    rows = spy_rows(engine, monkeypatch)
    first = []
    for seed in range(40):
        engine.generate("", dial=0.5, n=2, max_new_tokens=1, seed=seed, mode="mixture")
        first.append(int(rows[-1][0, 1]))
    assert 8 <= sum(first) <= 32


# ----------------------------------------------------------------------------- errors and export


def test_bad_mode_everywhere(engine, run, client, capsys):
    """An unknown mode is refused on every surface, naming the modes (engine), the field (HTTP, like FastAPI's
    own 422) or by argparse's choices (CLI)."""
    with pytest.raises(AbcgptError) as e:
        engine.mode("bogus")
    assert all(m in str(e.value) for m in MODES)
    with pytest.raises(AbcgptError):
        engine.generate(PROMPT, max_new_tokens=2, mode="bogus")
    for url, body in (("/api/generate", {"stream": False, "max_new_tokens": 2}), ("/v1/completions", {})):
        r = client.post(url, json=body | {"mode": "bogus"})
        assert r.status_code == 422, r.text
        assert any(d["loc"][-1] == "mode" for d in r.json()["detail"]), r.json()
    assert main(["sample", "--ckpt", str(run), "--mode", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'bogus'" in err and len(err.splitlines()) == 1


def test_calibration_of_another_mode_is_refused(engine, monkeypatch):
    """A calibration maps a wanted style share to a dial *in the mode it was measured in*; read in another mode it
    would give the wrong share silently, so it is refused, naming both modes."""
    monkeypatch.setattr(engine.meta, "calibration", Calibration(share=[0.0, 1.0], dial=[0.2, 0.6], mode="gates"))
    with pytest.raises(AbcgptError) as e:
        engine.dial_tensor(0.5, calibrated=True, mode="mixture")
    assert "gates" in str(e.value) and "mixture" in str(e.value)
    with pytest.raises(AbcgptError, match="gates"):
        engine.dial_tensor(0.5, calibrated=True)  # the default mode of a partition model is switch
    torch.testing.assert_close(engine.dial_tensor(0.5, calibrated=True, mode="gates"), torch.tensor([0.6, 0.4]))
    # a calibration stored before modes existed was measured in gates
    monkeypatch.setattr(engine.meta, "calibration", Calibration(share=[0.0, 1.0], dial=[0.0, 1.0]))
    torch.testing.assert_close(engine.dial_tensor(0.25, calibrated=True, mode="gates"), torch.tensor([0.75, 0.25]))
    with pytest.raises(AbcgptError, match="mixture"):
        engine.dial_tensor(0.25, calibrated=True, mode="mixture")


def test_export_between_corners_needs_gates(run, tmp_path, capsys, monkeypatch):
    """Between the corners the default mode (switch) runs two networks at generation time: no single GPT-2 to
    export. That is a one-line error before anything is written, suggesting a corner or mode gates; a corner
    exports."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(run), "--dial", "0.5", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("abcgpt: error:"), err
    assert "mode switch" in err and "corner" in err and "mode gates" in err
    assert captured.out == ""
    assert not out.exists() and not list(out.parent.glob(out.name + ".*.tmp"))

    assert main(["export", "--ckpt", str(run), "--dial", "omega", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["abcgpt"]["dial"] == {"alpha": 0.0, "omega": 1.0}
    # this model's LayerNorms take statistics over every channel: the corner is written at full width, and said so
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "full width" in lines[0] and config["n_embd"] == load_checkpoint(run).model.config.n_embd
    # the error's suggestion works: mode gates folds the network's own gates at the dial
    assert main(["export", "--ckpt", str(run), "--dial", "0.5", "--mode", "gates", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "config.json").is_file()


def test_network_is_one_gpt_only_where_one_gpt_computes_the_dial(engine):
    """Engine.network (what export writes): a corner in every mode and any dial in gates are one ordinary network,
    a SubNetwork (a corner at its own width); between the corners the combining modes are refused, naming the
    mode."""
    half = torch.tensor([0.5, 0.5])
    C = engine.model.config.n_embd
    for mode in MODES:
        net = engine.network(corner(1, 2), mode)
        assert isinstance(net, SubNetwork) and net.width == C // 2
    assert engine.network(half, "gates").width == C
    for mode in ("mixture", "switch", "tokens", "product"):
        with pytest.raises(AbcgptError, match=f"mode {mode}"):
            engine.network(half, mode)


def test_next_segment_source_deals_turns_in_the_dials_shares():
    """switch's generation: the corner furthest below its share after the next turn writes it."""
    a = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.3, 0.7, 0.0]])
    turns = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # row 0: 0.5 * 5 - 3 = -0.5 against 0.5 * 5 - 1 = 1.5; row 1: 0.9 * 2 - 1 = 0.8 against 0.1 * 2 - 0 = 0.2: a
    # small share waits (counted before the turn, 0.1 * 1 - 0 > 0.9 * 1 - 1, it would write the second turn);
    # row 2: 0.3 * 2 - 1 = -0.4 against 0.7 * 2 - 0 = 1.4
    assert next_segment_source(a, turns).tolist() == [1, 0, 1]
    # a corner the dial leaves out never writes, even when every other one is ahead of its share
    assert next_segment_source(torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 0.0]])).tolist() == [0]
    # dealt one turn at a time, the turns keep the dial's shares within one turn at every point
    for share in (0.1, 0.25, 0.5, 0.7):
        d, t = torch.tensor([[1 - share, share]]), torch.zeros(1, 2)
        for n in range(1, 41):
            t[0, int(next_segment_source(d, t))] += 1
            assert abs(float(t[0, 1]) - share * n) <= 1.0


def test_turn_ends_wait_for_a_turns_length():
    """A boundary ends a turn once the turn holds MIN_TURN_CHARS characters: a speaker's name on its line (or a
    blank line) stays with what follows it."""
    text = "KING LEAR:\nBlow, winds, and crack your cheeks!\n\nOnce upon a time.\nThe end of it all.\n"
    boundary = torch.tensor([[c == "\n" or c in ".!?" for c in text]])
    chars = torch.ones(1, len(text))
    ends = [i for i, e in enumerate(turn_ends(boundary, chars)[0].tolist()) if e]
    pieces = [text[i + 1:j + 1] for i, j in zip([-1] + ends, ends)]
    # the last line (19 characters with its line break) ends no turn yet: it is shorter than one
    assert pieces == ["KING LEAR:\nBlow, winds, and crack your cheeks!", "\n\nOnce upon a time.\n"]
    assert MIN_TURN_CHARS == 20
    # every boundary ends a turn when a turn may be one character long
    torch.testing.assert_close(turn_ends(boundary, chars, min_chars=1), boundary)


def test_switch_blends_inside_a_sample_where_mixture_does_not(engine):
    """At dial 0.5 switch hands sentences to both corners within one sample; mixture keeps each sample one source's
    text. This seconds-trained model seldom ends a line, so a fresh engine counts a space as a sentence end too."""
    words = Engine(engine.checkpoint)
    words._boundary = words._boundaries() | torch.tensor([words.tokenizer.decode([i]) == " "
                                                          for i in range(len(words._boundaries()))])

    def both(mode: str) -> int:
        texts = words.generate(" ", dial=0.5, max_new_tokens=150, temperature=0.3, seed=0, n=8, mode=mode)
        return sum(sum(c in ALPHA for c in t) >= 10 and sum(c in OMEGA for c in t) >= 10 for t in texts)

    assert both("switch") >= 6
    assert both("mixture") <= 1


# ----------------------------------------------------------------------------- one seed, one direction (issue 24)


def omega_share(text: str) -> float:
    """The share of a text's letters from omega's alphabet (the synthetic sources' styles are their alphabets)."""
    a, b = sum(c in "abcdefg" for c in text), sum(c in "tuvwxyz" for c in text)
    return b / max(1, a + b)


@pytest.mark.parametrize("mode", ["mixture", "switch", "tokens", "product", "gates"])
def test_a_dial_position_draws_the_same_random_numbers_alone_or_in_a_sweep(engine, mode):
    """Common random numbers: a sample's randomness depends on the seed and its place among the n samples, not on
    its row in the batch nor on the other dial positions, so a sweep shows what generate shows at each position."""
    dials = [0.0, 0.3, 0.5, 0.9]
    swept = engine.sweep("\n", dials, max_new_tokens=40, seed=7, n=2, mode=mode)
    alone = [engine.generate("\n", d, max_new_tokens=40, seed=7, n=2, mode=mode) for d in dials]
    assert swept == alone


def test_a_coin_flip_mode_switches_voice_once_along_the_dial(engine):
    """mixture draws one corner per sample at the dial's inverse CDF of one shared number: for every seed a sweep
    from 0.1 to 0.9 is the first source's voice up to some position and the second's after it, never back."""
    positions = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    switched = 0
    for seed in range(20):
        voices = [round(omega_share(t[0])) for t in engine.sweep("\n", positions, 60, seed=seed, mode="mixture")]
        assert voices == sorted(voices), (seed, voices)
        switched += voices[0] != voices[-1]
    assert switched >= 10  # and the switch happens inside the sweep, at a position that depends on the seed


def test_a_blend_changes_gradually_as_the_dial_moves(engine):
    """switch with one seed: a small step of the dial keeps most of the text (the same corner writes the same
    sentences from the same noise until the dial hands a sentence to the other), a large one changes it."""
    near = far = 0
    for seed in range(10):
        a, b, c = (t[0] for t in engine.sweep("\n", [0.50, 0.55, 0.95], 120, seed=seed, mode="switch"))
        near += sum(x == y for x, y in zip(a, b))
        far += sum(x == y for x, y in zip(a, c))
    assert near > far and near > 0.5 * 10 * 120, (near, far)
