"""Attribution: which source a text leans on, token by token (Engine.attribute, `abcgpt attribute`,
POST /api/attribute, the page's "which source?", the report's coloured samples). On a synthetic model whose two
sources use disjoint alphabets the right answer is known from the letters."""

import io
import json
import re
import sys

import pytest
import torch
from conftest import live_server, need_chromium, synthetic_text, train_synthetic

from abcgpt.checkpoint import load_checkpoint
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.engine import Attribution, Engine, token_pieces
from abcgpt.tokenizer import train_tokenizer

ALPHA, OMEGA = "abcdefg", "tuvwxyz"
SETTLE = 10  # tokens a line needs before its letters decide the posterior (the first few are weak evidence)


def words(alphabet: str, n_chars: int, seed: int) -> str:
    """One line of synthetic words over one alphabet."""
    return synthetic_text(alphabet, n_chars, seed).replace("\n", " ").strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_synthetic(tmp_path_factory.mktemp("attribution"), "train.steps=300", "train.eval_every=300")


@pytest.fixture(scope="module")
def engine(run) -> Engine:
    return Engine(load_checkpoint(run))


def tops(a: Attribution) -> list[str]:
    return [a.sources[k] for k in a.top_per_token()]


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("alphabet, source", [(ALPHA, "alpha"), (OMEGA, "omega")])
def test_each_alphabet_is_attributed_to_its_source(engine, alphabet, source):
    a = engine.attribute(words(alphabet, 80, 3))
    assert set(tops(a)[SETTLE:]) == {source}
    assert a.top == source and a.final[a.sources.index(source)] > 0.99
    assert a.mean[a.sources.index(source)] > 0.8


def test_a_text_that_switches_alphabet_switches_attribution(engine):
    first, second = words(ALPHA, 40, 4), words(OMEGA, 120, 5)
    a = engine.attribute(first + " " + second)
    t = tops(a)
    assert set(t[SETTLE:len(first)]) == {"alpha"}  # the first part
    assert set(t[-10:]) == {"omega"} and a.top == "omega"  # the second, once it outweighs the first
    # mixture's posterior is over the whole text so far: it turns only when the second part outweighs the first;
    # switch restarts it from the dial after each line end, so it turns within the line's first tokens
    text = first + "\n" + second
    mixture, switch = tops(engine.attribute(text)), tops(engine.attribute(text, mode="switch"))
    start = len(first) + 1
    assert set(switch[start + SETTLE:]) == {"omega"}
    assert mixture[start:].count("alpha") > switch[start:].count("alpha")


def test_the_summary(engine):
    text = words(ALPHA, 30, 6) + "\n" + words(OMEGA, 30, 7)
    a = engine.attribute(text, dial=0.3)
    assert "".join(a.tokens) == text and len(a.tokens) == len(a.posterior) == len(text)
    assert a.dial == pytest.approx([0.7, 0.3]) and a.posterior[0] == pytest.approx([0.7, 0.3])  # the prior
    assert a.final == a.posterior[-1]
    # in switch the per-token posterior restarts after each line end; the whole text's is still the mixture's
    switch = engine.attribute(text + "\n", dial=0.3, mode="switch")
    assert switch.posterior[-1] == pytest.approx([0.7, 0.3]) and switch.posterior != a.posterior
    assert switch.final == engine.attribute(text + "\n", dial=0.3).final
    assert a.mean == pytest.approx(torch.tensor(a.posterior[1:]).mean(0).tolist())  # tokens with evidence
    assert a.top == a.sources[max(range(2), key=a.final.__getitem__)]
    assert all(sum(p) == pytest.approx(1.0, abs=1e-5) for p in a.posterior)
    assert "".join(s for _, s in a.runs()) == text
    assert [k for k, _ in a.runs()] == [k for i, k in enumerate(a.top_per_token()) if i == 0 or
                                        k != a.top_per_token()[i - 1]]
    d = a.to_dict()
    assert set(d) == {"sources", "dial", "mode", "top", "final", "mean", "tokens", "top_per_token", "posterior"}
    assert d["posterior"][5] == [round(x, 4) for x in a.posterior[5]]
    one = engine.attribute("a")  # one token: nothing predicts it, so everything is the prior
    assert one.posterior == [one.dial] and one.final == one.mean == one.dial


@pytest.mark.parametrize("mode", ["mixture", "switch"])
@pytest.mark.parametrize("dial", ["uniform", 0.3, "omega"])
def test_the_posterior_is_the_weights_generation_uses(engine, mode, dial):
    """Within the context, the posterior after each prefix is the corner weights _prompt_log_weights gives
    generation after reading that prefix as a prompt."""
    text = words(ALPHA, 7, 8) + "\n" + words(OMEGA, 7, 9)
    ids = torch.tensor([engine.tokenizer.encode(text)])
    assert ids.size(1) <= engine.model.config.block_size
    post = engine.posteriors(ids, dial, mode)[0]
    d = engine.dial_tensor(dial, mode=mode)[None]
    for t in range(1, ids.size(1) + 1):
        want = engine._prompt_log_weights(ids[:, :t], d, mode).exp()[0]
        assert torch.allclose(post[t - 1], want, atol=1e-6), t


def test_a_long_text_is_scored_in_windows_and_the_posterior_carries_on(engine):
    """Longer than the context: each corner's log-probs are `loss`'s (windows that start fresh), and the
    posterior after the whole text is Bayes over all of them, not over the last window alone."""
    text = words(ALPHA, 70, 10) + " " + words(OMEGA, 50, 11)
    n = len(engine.tokenizer.encode(text))
    assert n > 4 * engine.model.config.block_size
    total = torch.tensor([-(n - 1) * engine.loss(text, src) for src in engine.sources])  # log p_k(text)
    want = torch.softmax(total + torch.tensor([0.5, 0.5]).log(), dim=0)
    a = engine.attribute(text)
    assert a.final == pytest.approx(want.tolist(), abs=1e-4)
    ids = torch.tensor([engine.tokenizer.encode(text)] * 3)  # batched rows agree with one row
    assert torch.allclose(engine.posteriors(ids)[2], torch.tensor(a.posterior), atol=1e-6)


def test_a_dial_that_leaves_a_source_out_keeps_it_at_zero(engine):
    a = engine.attribute(words(OMEGA, 40, 12), dial="alpha")
    assert all(p == [1.0, 0.0] for p in a.posterior)


def test_refusals(engine, monkeypatch):
    with pytest.raises(AbcgptError, match="mixture or switch"):
        engine.attribute("abc", mode="tokens")
    with pytest.raises(AbcgptError, match="empty"):
        engine.attribute("")
    with pytest.raises(AbcgptError, match="outside the model's"):
        engine.attribute("ABC")
    with pytest.raises(AbcgptError, match="outside"):
        engine.attribute("abc", dial=2)
    with pytest.raises(AbcgptError, match="string"):
        engine.attribute(b"abc")
    with pytest.raises(AbcgptError, match="token ids"):
        engine.posteriors(torch.tensor([[0, 99]]))
    monkeypatch.setattr(engine, "gated", False)
    with pytest.raises(AbcgptError, match="ungated"):
        engine.attribute("abc")


def test_token_pieces_keep_a_split_character_whole():
    """Byte-level BPE splits a character it has no token for into bytes: the character goes to the token that
    completes it, so no piece shows a half character and the pieces join to the text."""
    tok = train_tokenizer("bpe", {"a": "hello world, the cat sat\n" * 50}, vocab_size=300)
    text = "hello 日本 café ok"
    ids = tok.encode(text)
    pieces = token_pieces(tok, ids)
    assert len(ids) > len(text.split()) and len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces


# ----------------------------------------------------------------------------- the command line


def test_cli_json_and_plain(run, engine, capsys, monkeypatch, tmp_path):
    text = words(ALPHA, 30, 13) + "\n" + words(OMEGA, 30, 14)
    assert main(["attribute", "--ckpt", str(run), "--text", text, "--json", "--mode", "switch"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d == engine.attribute(text, mode="switch").to_dict()
    assert d["mode"] == "switch" and len(d["posterior"]) == len(d["tokens"]) == len(text)

    (tmp_path / "t.txt").write_text(text)
    assert main(["attribute", "--ckpt", str(run), "--file", str(tmp_path / "t.txt"), "--mode", "switch"]) == 0
    out = capsys.readouterr().out
    a = engine.attribute(text, mode="switch")
    assert f"top: {a.top}" in out and "\033[" not in out  # not a terminal: no colour codes
    assert "".join(f"[{a.sources[k]}: {s}]" for k, s in a.runs()) in out
    assert "[omega: " in out and "[alpha: " in out

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["attribute", "--ckpt", str(run), "-", "--mode", "switch"]) == 0
    out = capsys.readouterr().out
    assert "\033[30;48;5;" in out and "[alpha: " not in out  # a terminal: colours instead of brackets
    legend, coloured = out.split("\n", 4)[3:]  # after the three summary lines
    assert "alpha" in legend and "omega" in legend
    assert coloured.startswith("\033[30;48;5;") and re.sub("\033\\[[0-9;]*m", "", coloured) == text + "\n"


def test_cli_errors(run, capsys, tmp_path):
    def error(*args: str) -> str:
        assert main(["attribute", "--ckpt", str(run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("abcgpt: error:") and "\n" not in err
        return err

    assert "give the text once" in error()
    assert "give the text once" in error("--text", "abc", "--file", "x")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert "not UTF-8" in error("--file", str(tmp_path / "bad.txt"))
    assert "outside the model's" in error("--text", "ABC")
    assert "invalid choice" in error("--text", "abc", "--mode", "tokens")
    assert "outside [0, 1]" in error("--text", "abc", "--dial", "2")


# ----------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client(run):
    from fastapi.testclient import TestClient

    from abcgpt.serve import create_app

    return TestClient(create_app(run, max_prompt_chars=200))


def test_http_attribute(client, engine):
    text = words(ALPHA, 40, 15) + "\n" + words(OMEGA, 40, 16)
    r = client.post("/api/attribute", json={"text": text})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d == engine.attribute(text).to_dict()
    assert d["sources"] == ["alpha", "omega"] and d["mode"] == "mixture" and d["dial"] == [0.5, 0.5]
    assert "".join(d["tokens"]) == text and len(d["posterior"]) == len(d["top_per_token"]) == len(text)
    assert all(len(p) == 2 for p in d["posterior"])
    r = client.post("/api/attribute", json={"text": text, "dial": {"alpha": 1, "omega": 3}, "mode": "switch"})
    assert r.status_code == 200 and r.json()["dial"] == [0.25, 0.75] and r.json()["mode"] == "switch"
    assert "/api/attribute" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body, field", [
    ({"text": "a" * 201}, "text"),  # capped like the prompt
    ({"text": ""}, "text"),
    ({"text": "ABC"}, "text"),
    ({"text": "abc", "dial": 2}, "dial"),
    ({"text": "abc", "dial": "nosuch"}, "dial"),
    ({"text": "abc", "mode": "tokens"}, "mode"),
    ({}, "text"),
    ({"text": 5}, "text"),
])
def test_http_attribute_422_names_the_field(client, body, field):
    r = client.post("/api/attribute", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["body", field]


# ----------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def server(run):
    from abcgpt.serve import create_app

    need_chromium()
    with live_server(create_app(run, max_new_tokens=400)) as base:
        yield base


@pytest.mark.slow  # headless Chromium
def test_page_colours_follow_the_letters(server, page):
    """"which source?" on the output and on a pasted text: one coloured span per token, each coloured as its
    source, a legend; on the synthetic model a token's colour is the source whose alphabet it is from."""

    def spans() -> list[tuple[str, str]]:
        page.wait_for_function("document.querySelector('#attr-status').dataset.kind !== 'busy'", timeout=60_000)
        assert page.inner_text("#attr-status").startswith("done"), page.inner_text("#attr-status")
        return page.eval_on_selector_all("#attr-result .attr-tok", "s => s.map(e => [e.textContent, "
                                                                   "e.dataset.source])")

    page.goto(server)
    page.wait_for_selector("#dial")
    # a pasted text of lines from each alphabet, read per line (switch): each line's letters decide its colour
    lines = [words(ALPHA, 40, 20), words(OMEGA, 40, 21), words(ALPHA, 40, 22), words(OMEGA, 40, 23)]
    page.fill("#attr-text", "\n".join(lines))
    page.select_option("#attr-mode", "switch")
    page.click("#attr-paste")
    got = spans()
    assert "".join(t for t, _ in got) == "\n".join(lines)
    start = 0
    for line in lines:
        want = "0" if line[0] in ALPHA else "1"
        assert {k for _, k in got[start + SETTLE:start + len(line)]} == {want}, line
        start += len(line) + 1
    backgrounds = page.eval_on_selector_all("#attr-result .attr-tok", "s => s.map(e => e.style.background)")
    assert all(backgrounds) and len(set(backgrounds)) > 2  # coloured, by source and by how sure
    legend = page.inner_text("#attr-legend")
    assert "alpha" in legend and "omega" in legend and "whole text" in page.inner_text("#attr-summary")

    # a generated sample at omega's corner: every token after the first few coloured omega
    page.fill("#prompt", "")
    page.fill("#length", "60")
    page.eval_on_selector("#dial", "el => { el.value = '1'; el.dispatchEvent(new Event('input', "
                                   "{bubbles: true})); }")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('done')", timeout=60_000)
    page.select_option("#attr-mode", "mixture")
    page.click("#attr-output")
    got = spans()
    sample = page.inner_text("#output")
    assert "".join(t for t, _ in got) == page.eval_on_selector("#output", "e => e.textContent")
    assert sum(c in OMEGA for c in sample) > 30
    assert {k for t, k in got[SETTLE:] if t in ALPHA + OMEGA} == {"1"}


# ----------------------------------------------------------------------------- the report


def test_report_colours_a_few_samples(run):
    import dataclasses

    from abcgpt.report import Settings, build_report
    from abcgpt.report_render import to_html, to_markdown

    settings = dataclasses.replace(Settings.quick(samples=2), prompt=" ")
    report, figures = build_report(run, quick=True, settings=settings, progress=False, mode="switch")
    got = report.attribution
    assert [a.dial for a in got] == [report.style.edges[0].dial[i] for i in (0, 1, 2)]
    assert all(a.mode == "switch" and "".join(s for _, s in a.runs) == " " + e
               for a, e in zip(got, report.style.edges[0].example))
    omega = sum(len(s) for k, s in got[-1].runs if k == 1)  # the omega corner's sample, read per line
    assert omega > 0.8 * sum(len(s) for _, s in got[-1].runs)
    assert report.to_dict()["attribution"][0]["runs"]
    md = to_markdown(report)
    assert "## Which source each token leans on" in md and "[omega: " in md
    html = to_html(report, md, {})
    assert 'style="background:#ff7f0e55"' in html  # omega's colour
