"""A recipe that cannot train every source is refused (config.check_units): under the partition method every source
must own a residual channel, an attention head in each layer and an MLP unit; the refusal names the smallest sizes
that do, and those are accepted and train every source."""

import math
import re

import pytest
from conftest import source_tables, synthetic_text, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abcgpt.bank import CornerBank
from abcgpt.checkpoint import load_checkpoint
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.config import build_recipe, load_recipe
from abcgpt.data import prepared_data
from abcgpt.dial import corner
from abcgpt.heldout import heldout_loss
from abcgpt.model import GPTConfig, build_model
from abcgpt.train import train

MINIMUM = re.compile(r"use model\.n_head >= (\d+) and model\.n_embd >= (\d+) \((\d+) MLP units\)")


def six_sources(tmp) -> str:
    """write_recipe's recipe (n_layer 1, n_head 2, n_embd 16) over six synthetic sources with disjoint alphabets."""
    paths = {}
    for k in range(6):
        paths[f"s{k}"] = tmp / f"s{k}.txt"
        paths[f"s{k}"].write_text(synthetic_text("abcdefghijklmnopqrstuvwx"[4 * k:4 * k + 4], 6_000, k))
    return str(write_recipe(tmp, sources=source_tables(**paths)))


def owned_counts(model) -> list[list[int]]:
    """Per group of units (residual channels, then each layer's heads and MLP units) the number each source owns in a
    built partition model: units whose specialty is that source alone (GPT), or the units of a corner that are not
    shared (CornerBank: every source's corner has the same shapes)."""
    cfg = model.config
    if isinstance(model, CornerBank):
        counts = {p.name: [v - c for v, c in zip(p.view, p.counts)] for p in model.pieces}
        own = [counts["transformer.ln_f.weight"][0]]
        for i in range(cfg.n_layer):
            head_dims = counts[f"transformer.h.{i}.attn.c_proj.weight"][1]
            own += [head_dims // (cfg.n_embd // cfg.n_head), counts[f"transformer.h.{i}.mlp.c_fc.weight"][0]]
        return [[n] * cfg.n_sources for n in own]
    groups = model.specialties.split(model.group_sizes)
    return [(g == 1).sum(0).tolist() for g in groups]


def every_source_owns_every_kind(model) -> bool:
    return all(min(group) >= 1 for group in owned_counts(model))


def test_six_sources_on_four_channels_are_refused_naming_the_minimum(tmp_path):
    recipe = six_sources(tmp_path)
    with pytest.raises(AbcgptError) as e:
        load_recipe(recipe, ["model.n_embd=4"])
    message = str(e.value)
    assert "\n" not in message
    assert "no attention head in a layer and no residual channel of its own" in message
    assert MINIMUM.search(message).groups() == ("6", "6", "24")


def test_the_cli_refuses_it_in_one_line_before_any_work(tmp_path, capsys):
    recipe = six_sources(tmp_path)
    code = main(["train", "--config", recipe, "--set", "model.n_embd=4", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("abcgpt: error: recipe synthetic leaves")
    assert "use model.n_head >= 6 and model.n_embd >= 6 (24 MLP units)" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_the_minimum_is_accepted_and_trains_every_source(tmp_path):
    recipe = load_recipe(six_sources(tmp_path), ["model.n_head=6", "model.n_embd=6", "train.steps=60",
                                                 "train.eval_every=60", "train.lr=1e-2"])
    train(recipe, tmp_path / "run", progress=False)
    model = load_checkpoint(tmp_path / "run" / "last").model
    assert owned_counts(model) == [[1] * 6, [1] * 6, [4] * 6]  # one channel, one head, four MLP units each
    data = prepared_data(recipe, progress=False)
    uniform = math.log(model.config.vocab_size)
    for k, tokens in enumerate(data.heldout):  # every corner learned its source: well below a uniform guess
        assert heldout_loss(model, tokens, corner(k, 6), 8, 2) < uniform - 0.5


@pytest.mark.parametrize("sets, lacking, minimum", [
    (["model.n_head=4", "model.n_embd=64"], "no attention head in a layer of its own", ("6", "6", "24")),
    (["model.n_head=7", "model.n_embd=63", "model.shared_fraction=0.25"], "no attention head in a layer of its own",
     ("8", "8", "32")),
    (['model.width="corner"', "model.n_head=4", "model.n_embd=4", "model.shared_fraction=0.9"],
     "no attention head in a layer and no residual channel of its own", ("5", "5", "20")),
])
def test_heads_and_shared_units_count(tmp_path, sets, lacking, minimum):
    """Six sources: heads alone can be too few; shared units are no source's own; a bank of corners needs units of its
    own whatever the number of sources."""
    with pytest.raises(AbcgptError) as e:
        load_recipe(six_sources(tmp_path), sets)
    assert lacking in str(e.value) and MINIMUM.search(str(e.value)).groups() == minimum


def test_too_few_mlp_units_are_named_and_the_reference_method_is_not_refused():
    raw = {"data": {"sources": [{"name": f"s{k}", "path": "/none.txt"} for k in range(20)]},
           "model": {"n_head": 4, "n_embd": 4}}
    with pytest.raises(AbcgptError, match="no attention head in a layer, no residual channel and no MLP unit of its "
                                          "own .*use model.n_head >= 20 and model.n_embd >= 20 "):
        build_recipe(raw, "twenty")
    build_recipe({**raw, "model": {"n_head": 4, "n_embd": 4, "method": "reference"}}, "twenty")
    build_recipe({**raw, "model": {"n_head": 4, "n_embd": 4, "gates": "none"}}, "twenty")


def raw_recipe(n_sources: int, model: dict) -> dict:
    return {"data": {"sources": [{"name": f"s{k}", "path": "/none.txt"} for k in range(n_sources)]}, "model": model}


def refusal(n_sources: int, model: dict) -> str | None:
    """The one-line refusal of a recipe with this [model] table, or None if it is accepted."""
    try:
        build_recipe(raw_recipe(n_sources, model), "prop")
    except AbcgptError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


def built(n_sources: int, model: dict):
    """The model a [model] table builds, validated or not (vocabulary and sources as the data would set them)."""
    return build_model(GPTConfig(**model, vocab_size=8, n_sources=n_sources))


MODELS = st.fixed_dictionaries({
    "n_layer": st.integers(1, 2), "n_head": st.integers(1, 10),
    "shared_fraction": st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9]) | st.floats(0.0, 0.95),
    "width": st.sampled_from(["total", "corner"]), "method": st.sampled_from(["partition", "reference"]),
    "gates": st.sampled_from(["abc", "none"]), "shared_gate": st.sampled_from(["always", "middle"]),
}).filter(lambda m: m["width"] == "total" or (m["method"], m["gates"], m["shared_gate"]) == ("partition", "abc",
                                                                                              "always"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_sources=st.integers(2, 12), model=MODELS, times=st.integers(1, 4))
def test_validate_accepts_exactly_when_every_source_owns_every_kind_of_unit(n_sources, model, times):
    model = dict(model, n_embd=times * model["n_head"])
    refused = refusal(n_sources, model)
    if model["gates"] == "none" or model["method"] == "reference":
        assert refused is None  # no unit is one source's alone: the rule is the partition method's
        return
    assert (refused is None) == every_source_owns_every_kind(built(n_sources, model))
    if refused is None:
        return
    # the minimum it names is accepted and owns every kind; one head fewer is refused whatever n_embd, and so is one
    # channel fewer
    heads, embd, units = map(int, MINIMUM.search(refused).groups())
    assert units == 4 * embd
    smallest = dict(model, n_head=heads, n_embd=embd)
    assert refusal(n_sources, smallest) is None and every_source_owns_every_kind(built(n_sources, smallest))
    if heads > 1:
        assert "of its own" in refusal(n_sources, dict(model, n_head=heads - 1, n_embd=4 * (heads - 1)))
    assert refusal(n_sources, dict(smallest, n_embd=embd - 1)) is not None


def test_a_gpt_built_outside_a_recipe_is_not_checked():
    """The rule is the recipe's: GPT itself still builds any shape (tests and benchmarks build odd ones on purpose)."""
    assert min(owned_counts(built(6, {"n_layer": 1, "n_head": 2, "n_embd": 4}))[0]) == 0
