import json
import os

import pytest
import torch
from conftest import write_recipe

from abcgpt.checkpoint import load_checkpoint
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.dial_spec import parse_dial
from abcgpt.engine import generate_tokens
from abcgpt.export import export_gpt2
from abcgpt.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

# block_size 64: transformers' generate cannot slide past n_positions, and prompt + 20 new tokens must fit
STEPS = ["train.steps=40", "model.block_size=64"]
TEXT = "abc defg\n\nga  b\n fed"  # spaces, runs of spaces and newlines, all in the alpha alphabet


def _run(tmp_path_factory, name, extra):
    tmp = tmp_path_factory.mktemp(name)
    train(load_recipe(str(write_recipe(tmp)), STEPS + extra), tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return _run(tmp_path_factory, "export_char", [])


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    # with biases (the char run has none, so zero biases are exported for it)
    return _run(tmp_path_factory, "export_bpe", ["data.tokenizer=bpe", "data.vocab_size=300", "model.bias=true"])


@pytest.fixture(scope="module")
def active_run(tmp_path_factory):
    # model.norm = "active": a corner is a standard GPT-2 of half the width (plus the shared units)
    return _run(tmp_path_factory, "export_active", ["model.norm=active", "model.shared_fraction=0.5", "model.bias=true",
                                                    "model.n_embd=32", "model.n_head=4"])


def check_equivalent(run, dial, out, notes=None):
    """The exported folder, loaded by transformers alone, computes what the gated model computes at the dial."""
    export_gpt2(run, dial, out, mode="gates", notes=notes)  # the gated network at that dial, folded
    ckpt = load_checkpoint(run)
    d, _ = parse_dial(dial, ckpt.sources)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)

    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == ckpt.tokenizer.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok.encode(TEXT)) == TEXT  # default arguments too

    x = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = ckpt.model.eval()(x, d, targets=x)
        theirs = hf(x).logits
    assert theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-4

    prompt = x[:, :8]
    mine = torch.stack(list(generate_tokens(ckpt.model, prompt, d, 20, temperature=0)), dim=1)
    with torch.no_grad():
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert gen[:, prompt.size(1):].tolist() == mine.tolist()
    return ckpt, tok


@pytest.mark.parametrize("dial", ["0.3", "omega"])
def test_char_export_matches_the_gated_model(char_run, tmp_path, dial):
    ckpt, tok = check_equivalent(char_run, dial, tmp_path / "hf")
    assert not ckpt.model.config.bias
    # every character of the vocabulary maps to its own id, and back
    chars = "".join(ckpt.tokenizer.chars)
    assert tok.encode(chars, add_special_tokens=False) == list(range(len(chars)))
    assert tok.decode(list(range(len(chars)))) == chars
    assert len(tok) == ckpt.model.config.vocab_size  # no extra token the model has no row for
    with pytest.raises(Exception, match="UNK"):  # documented: a character outside the vocabulary cannot encode
        tok.encode("Q")


def test_a_corner_is_exported_at_its_own_width_where_layer_norm_allows(active_run, char_run, tmp_path):
    """norm = "active": the corner's own width, a GPT-2 of 16 + 8 of the 32 channels, 3 of 4 heads and 96 of 128
    MLP units (between corners its statistics are weighted by the gates: refused, in one line). norm = "full" (the
    default): the full width, and a note that says why."""
    notes = []
    check_equivalent(active_run, "omega", tmp_path / "narrow", notes)
    cfg = json.loads((tmp_path / "narrow" / "config.json").read_text())
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_inner"]) == (24, 3, 96) and notes == []
    assert "the dial's own width" in (tmp_path / "narrow" / "README.md").read_text()
    with pytest.raises(AbcgptError, match="gates between 0 and 1"):  # weighted statistics: not a GPT-2 LayerNorm
        export_gpt2(active_run, "0.3", tmp_path / "middle", mode="gates")
    assert not (tmp_path / "middle").exists()

    check_equivalent(char_run, "omega", tmp_path / "full", notes)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["n_embd"] == 16
    assert len(notes) == 1 and 'model.norm = "full"' in notes[0] and "model.norm=active" in notes[0]
    assert notes[0] in (tmp_path / "full" / "README.md").read_text()


def test_bpe_export_matches_the_gated_model(bpe_run, tmp_path):
    ckpt, tok = check_equivalent(bpe_run, "uniform", tmp_path / "hf")
    assert ckpt.tokenizer.kind == "bpe" and ckpt.model.config.bias
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ckpt.tokenizer.eot_id
    text = "Ünïcode and bytes the model never saw: 日本 🙂\n"  # byte-level: anything encodes and round-trips
    assert tok.encode(text) == ckpt.tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == text
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == ckpt.tokenizer.eot_id


def test_config_card_and_files(char_run, tmp_path):
    out = export_gpt2(char_run, "alpha=1,omega=3", tmp_path / "hf", mode="gates")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not list(tmp_path.glob("hf.*.tmp"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu"
    assert cfg["n_positions"] == 64 and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0
    assert cfg["abcgpt"]["sources"] == ["alpha", "omega"]
    assert cfg["abcgpt"]["dial"] == {"alpha": 0.25, "omega": 0.75}
    card = (out / "README.md").read_text()
    assert "alpha, omega" in card and "alpha = 0.25, omega = 0.75" in card
    assert "No report was found" in card and "AutoModelForCausalLM" in card and "step 40" in card


def test_card_has_the_reports_numbers(char_run, tmp_path):
    cell = {"mean": 1.234, "ci95": [1.2, 1.3], "batches": 2}
    report = {"step": 40, "corners": {"table": {"alpha": {"alpha": cell, "omega": dict(cell, mean=4.321)},
                                                "omega": {"alpha": cell, "omega": cell}},
                                      "middle": {"alpha": dict(cell, mean=2.5), "omega": dict(cell, mean=2.75)}}}
    (char_run / "report").mkdir(exist_ok=True)
    (char_run / "report" / "report.json").write_text(json.dumps(report))
    try:
        card = (export_gpt2(char_run, "alpha", tmp_path / "a") / "README.md").read_text()
        assert "the alpha corner" in card and "| omega | 4.321 |" in card
        card = (export_gpt2(char_run, "uniform", tmp_path / "u", mode="gates") / "README.md").read_text()
        assert "middle" in card and "| alpha | 2.500 |" in card and "| omega | 2.750 |" in card
        card = (export_gpt2(char_run, "0.3", tmp_path / "m", mode="gates") / "README.md").read_text()
        assert "no held-out numbers for this dial" in card
    finally:
        (char_run / "report" / "report.json").unlink()


def test_bad_input(char_run, tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(AbcgptError, match="unknown source 'shakespeare'"):
        export_gpt2(char_run, "shakespeare=1", out)
    with pytest.raises(AbcgptError, match="outside"):
        export_gpt2(char_run, "1.5", out)
    assert not out.exists() and not list(tmp_path.glob("hf.*.tmp"))
    with pytest.raises(AbcgptError, match="does not exist"):
        export_gpt2(tmp_path / "nowhere", "0.5", out)

    export_gpt2(char_run, "alpha", out)
    with pytest.raises(AbcgptError, match=r"exists; use --force to overwrite") as e:
        export_gpt2(char_run, "omega", out)
    assert "\n" not in str(e.value)
    export_gpt2(char_run, "omega", out, force=True)  # its own earlier export: replaced
    assert not list(tmp_path.glob("hf.*.tmp"))
    assert json.loads((out / "config.json").read_text())["abcgpt"]["dial"] == {"alpha": 0.0, "omega": 1.0}
