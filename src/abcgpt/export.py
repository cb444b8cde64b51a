"""Export a checkpoint, folded at one dial, as a Hugging Face transformers GPT-2 folder.

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer files and a model card
(README.md); `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load it with
no abcgpt code. The model is the dial's SubNetwork (model.py): an ordinary GPT-2 with the logits of the gated
model at that dial, at its own width where that is a standard GPT-2 (a corner of a model trained with
model.norm = "active": 1/N of the channels, heads and MLP units, plus the shared ones), else at full width, with a
one-line note saying why. transformers is needed here only (not a runtime dependency): `pip install transformers`.

Tokenizers. A byte-level BPE tokenizer is saved as is (every text encodes). A char tokenizer becomes a
`tokenizers` WordLevel model over its characters, one piece per character, joined back with no spaces; it has
no unknown token (that would need an id the model does not have), so encoding a character outside the
vocabulary fails with an error, as abcgpt's own CharTokenizer does. Neither tokenizer adds special tokens.
"""

import dataclasses
import json
from pathlib import Path

import torch

from abcgpt.checkpoint import Checkpoint, load_checkpoint
from abcgpt.common import AbcgptError, atomic_dir, check_output, check_writable
from abcgpt.dial_spec import format_dial
from abcgpt.engine import Engine
from abcgpt.model import GPT, SubNetwork
from abcgpt.tokenizer import EOT, BPETokenizer, CharTokenizer

# our nn.Linear weights are (out, in); transformers' GPT-2 Conv1D stores (in, out)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise AbcgptError("export needs the transformers package: pip install transformers") from None
    return transformers


def exported_files(folder: Path) -> set[str] | None:
    """The files of an export written before outputs were marked (its config.json says it is ours)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        ours = isinstance(config, dict) and "abcgpt" in config
    except (OSError, ValueError, TypeError):
        return None
    return {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"} if ours else None


def export_gpt2(ckpt_path: Path, dial: str, out: Path, force: bool = False, mode: str | None = None,
                notes: list[str] | None = None) -> Path:
    """Write a transformers GPT-2 folder for the checkpoint's model folded at `dial` (a dial spec as users type
    it: "0.3", a source name, "uniform", "a=0.2,b=0.8"). Returns `out`. With force an existing `out` is
    replaced atomically (the new folder is written to out.tmp, then swapped in).

    Only a dial that one network computes can be exported (Engine.network): a corner in any mode, or any dial in
    mode gates. Between corners, the combining modes (the default, switch, among them) run several corner networks
    at generation time; that is refused with a one-line error, before anything is written. Where the dial's own
    width is not a standard GPT-2, the full-width network is written and `notes` gets a line saying why."""
    out = check_output(out, "export", exported_files)  # never a folder it did not write, even with force
    if out.exists() and not force:
        raise AbcgptError(f"{out} exists; use --force to overwrite")
    check_writable(out.parent)
    tf = _transformers()
    ckpt = load_checkpoint(Path(ckpt_path), "cpu")
    ckpt.model.float()
    engine, dial_notes = Engine(ckpt), []
    weights = engine.dial_tensor(dial, notes=dial_notes)
    plain = engine.network(weights, mode)
    note = dial_notes[0] if dial_notes else None
    notes = [] if notes is None else notes
    if isinstance(plain, SubNetwork):
        why = not_standard(plain)
        full = SubNetwork(ckpt.model, weights, own_width=False) if why and plain.width < plain.config.n_embd else None
        if full is not None and not_standard(full) is None:
            notes.append(f"written at full width ({plain.config.n_embd} channels), not the dial's own "
                         f"({plain.width}): {why}")
            plain, why = full, None
        if why:
            raise AbcgptError(f"cannot export dial {format_dial(weights, ckpt.sources)} as a GPT-2: {why}")

    with atomic_dir(out, "export", exported_files) as tmp:
        hf_tok, special = _hf_tokenizer(ckpt, tf)
        hf_model = _hf_model(plain, ckpt, dial, weights, special, tf)
        hf_model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(ckpt, Path(ckpt_path), dial, weights, [note, *notes],
                                                   hf_model.config, out.name),
                                       encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- model


def not_standard(net: SubNetwork) -> str | None:
    """Why a sub-network is not a standard GPT-2 (None if it is). Heads and MLP units may differ from layer to
    layer (a layer is padded with silent ones up to the most), but GPT-2's LayerNorm takes plain statistics
    over its own channels, and its heads span them exactly."""
    sub, width = net.sub, net.width
    hd = net.config.n_embd // net.config.n_head
    if sub.stat_gate is not None:
        return "model.norm = \"active\" weighs LayerNorm's statistics by gates between 0 and 1 at this dial"
    if sub.width != width:
        return (f"model.norm = \"full\" takes LayerNorm's statistics over all {sub.width} channels, the silenced "
                f"ones included (train with --set model.norm=active for a corner that is a narrow GPT-2)")
    if width % hd or max(sub.heads) > width // hd:
        return f"its {width} channels are not a whole number of heads of {hd}, at least {max(sub.heads)} of them"
    return None


def gpt2_weights(net: SubNetwork) -> tuple[dict[str, torch.Tensor], int, int]:
    """A standard sub-network's weights as GPT-2's (width / head_dim heads and the most MLP units of any layer in
    every layer: the added ones have zero weights, so they add nothing), with its n_head and n_inner."""
    w, cfg = dict(net.sub.weights), net.config
    hd = cfg.n_embd // cfg.n_head
    n_head = net.width // hd
    n_inner = max(w[f"transformer.h.{i}.mlp.c_fc.weight"].size(0) for i in range(cfg.n_layer))

    def pad(t, dim, size):  # zeros after t along dim, up to size
        extra = list(t.shape)
        extra[dim] = size - t.size(dim)
        return torch.cat([t, t.new_zeros(extra)], dim=dim)

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name in ("attn.c_attn.weight", "attn.c_attn.bias"):  # q, k and v of the heads, each padded
            if p + name in w:
                w[p + name] = torch.cat([pad(t, 0, n_head * hd) for t in w[p + name].chunk(3, dim=0)])
        w[p + "attn.c_proj.weight"] = pad(w[p + "attn.c_proj.weight"], 1, n_head * hd)
        w[p + "mlp.c_fc.weight"] = pad(w[p + "mlp.c_fc.weight"], 0, n_inner)
        if p + "mlp.c_fc.bias" in w:
            w[p + "mlp.c_fc.bias"] = pad(w[p + "mlp.c_fc.bias"], 0, n_inner)
        w[p + "mlp.c_proj.weight"] = pad(w[p + "mlp.c_proj.weight"], 1, n_inner)
    w["lm_head.weight"] = w["transformer.wte.weight"]
    return w, n_head, n_inner


def _hf_model(plain: GPT | SubNetwork, ckpt: Checkpoint, spec: str, weights: torch.Tensor, special: dict, tf):
    c = plain.config
    if isinstance(plain, SubNetwork):
        (ours, n_head, n_inner), n_embd = gpt2_weights(plain), plain.width
    else:  # an ungated model
        ours, n_embd, n_head, n_inner = plain.state_dict(), c.n_embd, c.n_head, 4 * c.n_embd
    abc = {
        "sources": ckpt.sources,
        "dial": dict(zip(ckpt.sources, [round(w, 6) for w in weights.tolist()])),
        "dial_spec": str(spec),
        "gated": ckpt.model.config.gates == "abc",
        "recipe": ckpt.recipe.name,
        "step": ckpt.meta.step,
        "tokenizer": ckpt.tokenizer.kind,
        "checkpoint_model": dataclasses.asdict(ckpt.model.config),
        "width": n_embd,
    }
    cfg = tf.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=n_embd, n_layer=c.n_layer, n_head=n_head,
        n_inner=n_inner, activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=special["bos_id"], eos_token_id=special["eos_id"],
        pad_token_id=None,
    )
    cfg.abcgpt = abc
    hf = tf.GPT2LMHeadModel(cfg).eval()
    used = set()
    new = {}
    for k, v in hf.state_dict().items():
        if k in ours:
            src = ours[k]
            used.add(k)
            new[k] = (src.t() if k.endswith(_CONV1D) else src).contiguous().float()
        elif k.endswith(".bias") and k[: -len(".bias")] + ".weight" in ours:
            new[k] = torch.zeros_like(v)  # a model trained with bias=False
        else:
            new[k] = v  # transformers' own buffers (the causal mask in older versions)
        if new[k].shape != v.shape:
            raise AbcgptError(f"cannot export: {k} has shape {tuple(new[k].shape)}, GPT-2 expects {tuple(v.shape)}")
    left = set(ours) - used
    if left:
        raise AbcgptError(f"cannot export: weights with no GPT-2 counterpart: {', '.join(sorted(left)[:5])}")
    hf.load_state_dict(new, strict=True)
    hf.tie_weights()
    hf.generation_config = tf.GenerationConfig(
        bos_token_id=special["bos_id"], eos_token_id=special["eos_id"],
        pad_token_id=special["eos_id"],
    )
    return hf


# ----------------------------------------------------------------------------- tokenizer


def _hf_tokenizer(ckpt: Checkpoint, tf):
    """(PreTrainedTokenizerFast, {"bos_id", "eos_id"}) equivalent to the checkpoint's tokenizer."""
    tok = ckpt.tokenizer
    if isinstance(tok, BPETokenizer):
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_str(tok.tok.to_str())
        eot = EOT if tok.eot_id is not None else None
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, bos_token=eot, unk_token=eot,
                                          clean_up_tokenization_spaces=False)
        return fast, {"bos_id": tok.eot_id, "eos_id": tok.eot_id}
    if isinstance(tok, CharTokenizer):
        return _char_tokenizer(tok, tf), {"bos_id": None, "eos_id": None}
    raise AbcgptError(f"cannot export a {getattr(tok, 'kind', type(tok).__name__)} tokenizer to transformers")


def _char_tokenizer(tok: CharTokenizer, tf):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    bad = [c for c in tok.chars if 0xD800 <= ord(c) <= 0xDFFF]
    if bad:
        raise AbcgptError(f"cannot export the char tokenizer: its vocabulary has a lone surrogate ({bad[0]!r}), "
                          "which Hugging Face tokenizers cannot represent")
    vocab = {c: i for i, c in enumerate(tok.chars)}
    # no unk token: every id belongs to a character. WordLevel then fails on a character it does not know.
    backend = HFTokenizer(models.WordLevel(vocab, unk_token=None))
    # "[\s\S]" matches any one character, "\n" included ("." does not in Oniguruma's default syntax)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    probe = "".join(tok.chars)
    if fast.encode(probe, add_special_tokens=False) != tok.encode(probe) or fast.decode(tok.encode(probe)) != probe:
        raise AbcgptError("cannot export the char tokenizer: Hugging Face tokenizers does not reproduce it")
    return fast


# ----------------------------------------------------------------------------- model card


def _report(ckpt: Checkpoint, given: Path) -> tuple[dict | None, Path | None]:
    """The report of the checkpoint's run (<run>/report/report.json), if one was written."""
    candidates = [given / "report", ckpt.path / "report"]
    if ckpt.run is not None:
        candidates.append(ckpt.run / "report")
    for d in candidates:
        f = d / "report.json"
        if f.is_file():
            try:
                return json.loads(f.read_text()), f
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
    return None, None


def _heldout_lines(ckpt: Checkpoint, given: Path, weights: torch.Tensor) -> list[str]:
    report, f = _report(ckpt, given)
    if report is None:
        return ["No report was found for this run (`abcgpt eval` writes `<run>/report/report.json`)."]
    sources, w = ckpt.sources, weights.tolist()
    row, where, corners = None, None, report.get("corners") or {}
    if max(w) > 1 - 1e-6:
        t = sources[w.index(max(w))]
        row, where = (corners.get("table") or {}).get(t), f"the {t} corner"
    elif all(abs(x - 1.0 / len(w)) < 1e-6 for x in w):
        row, where = corners.get("middle"), "the middle (uniform dial)"
    else:  # a point of the report's loss curve (first source's corner to the last's)
        curve = report.get("loss_curve") or {}
        for i, t in enumerate(curve.get("t", [])):
            on_path = all(abs(x) < 1e-6 for x in w[1:-1]) and abs(w[-1] - t) < 1e-6
            if on_path:
                row = {s: curve["loss"][s][i] for s in sources if s in curve.get("loss", {})}
                where = f"dial {t:.2f} of the report's loss curve"
                break
    if not isinstance(row, dict) or not row:
        return [f"The run's report ({f}) has no held-out numbers for this dial: it measures the corners, "
                "the uniform dial and the points of its loss curve."]
    lines = [f"Held-out loss (nats per token) at {where}, from the run's report (step {report.get('step')}):", "",
             "| held-out source | loss | 95% CI |", "|---|---|---|"]
    for s in sources:
        cell = row.get(s) or {}
        ci = cell.get("ci95") or [float("nan")] * 2
        lines.append(f"| {s} | {cell.get('mean', float('nan')):.3f} | {ci[0]:.3f} to {ci[1]:.3f} |")
    if report.get("step") != ckpt.meta.step:
        lines += ["", f"Note: the report is of step {report.get('step')}; this export is of step "
                      f"{ckpt.meta.step}."]
    return lines


def _model_card(ckpt: Checkpoint, given: Path, spec: str, weights: torch.Tensor, notes: list[str | None],
                hf, name: str) -> str:
    c = ckpt.model.config
    sources = ckpt.sources
    w = ", ".join(f"{s} = {x:.3g}" for s, x in zip(sources, weights.tolist()))
    gated = c.gates == "abc"
    lines = [
        f"# abcgpt export: {ckpt.recipe.name}, dial {format_dial(weights, sources)}", "",
        "abcgpt trains one GPT-2 on several corpora with a dial that chooses which of them it leans on; this is "
        "that model with the dial fixed and folded into its weights, an ordinary GPT-2.", "",
        "## Sources and dial", "",
        f"- Sources, in dial order: {', '.join(sources)}",
        f"- Dial exported: `{spec}` (weights: {w})" if gated else
        "- Dial: none (an ungated baseline model; the dial has no effect)",
    ]
    lines += [f"- Note: {note}" for note in notes if note]
    if gated and int((weights > 0).sum()) > 1:  # only mode gates folds a dial between corners (Engine.network)
        lines.append("- Between corners this is the network's own gates at the dial (mode `gates`), not the "
                     "mixture of its corners that abcgpt generates by default there")
    lines += [
        "", "## Model", "",
        f"- GPT-2: {hf.n_layer} layers, {hf.n_head} heads, {hf.n_embd} embedding width, {hf.n_inner} MLP units, "
        f"context {hf.n_positions} tokens, vocabulary {hf.vocab_size} ({ckpt.tokenizer.kind} tokenizer)"
        + (f"; the dial's own width: the trained model has {c.n_embd} channels, {c.n_head} heads and "
           f"{4 * c.n_embd} MLP units" if gated and hf.n_embd < c.n_embd else ""),
        f"- Parameters: {ckpt.meta.num_params:,} in the trained model",
        f"- Recipe: {ckpt.recipe.name}; step {ckpt.meta.step}; checkpoint `{ckpt.path}`",
        "",
        "## Held-out numbers", "",
        *_heldout_lines(ckpt, given, weights),
        "", "## Usage", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'ids = tok("\\n", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=200)",
        "print(tok.decode(out[0]))",
        "```",
        "",
        f"The context is {c.block_size} tokens: prompt plus new tokens must fit in it (abcgpt's own sampler slides "
        "the window for longer texts).",
    ]
    if ckpt.tokenizer.kind == "char":
        lines.append("The tokenizer is character-level: a character outside its vocabulary cannot be encoded "
                     "(encoding raises an error).")
    return "\n".join(lines) + "\n"
