"""Memory estimates (memory.py): exact parameter counts, estimates that grow as they should, a refusal that
allocates nothing, and one real run measured against its estimate."""

import dataclasses
import json
import os
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import REPO

from abcgpt import memory
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.dial import corner
from abcgpt.memory import (
    corner_widths,
    generation_bytes,
    generation_parts,
    param_counts,
    require_memory,
    training_bytes,
    training_parts,
)
from abcgpt.model import GPTConfig, SubNetwork, build_model

SMALL = dict(vocab_size=37, block_size=20, n_layer=2, n_head=4, n_embd=32)


def recipe(*overrides: str, vocab: int = 65):
    """The tiny recipe with overrides, its model completed as the trainer completes it (vocabulary, sources)."""
    r = load_recipe("tiny", list(overrides))
    return dataclasses.replace(r.model, vocab_size=vocab), r.train


@pytest.mark.parametrize("kw", [
    {}, {"gates": "none"}, {"bias": True}, {"n_sources": 4, "shared_fraction": 0.25},
    {"width": "corner", "n_sources": 3}, {"width": "corner", "n_sources": 5, "shared_fraction": 0.3, "bias": True},
    {"width": "corner", "n_sources": 4, "shared_fraction": 0.5, "n_head": 6, "n_embd": 48},
])
def test_parameter_counts_are_the_models(kw):
    cfg = GPTConfig(**(SMALL | kw))
    model = build_model(cfg)
    total, one_corner = param_counts(cfg)
    assert total == model.num_params()
    assert one_corner == (model.corner_params() if hasattr(model, "corner_params") else model.num_params())
    assert memory._buffer_bytes(cfg) == sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("kw", [{}, {"n_sources": 3, "shared_fraction": 0.25}, {"norm": "active"},
                                {"n_sources": 3, "shared_fraction": 0.5, "shared_gate": "middle"},
                                {"gate_norms": False}])
def test_corner_widths_bound_every_corners_sub_network(kw):
    """The widths the estimates use are the widest corner's: what its SubNetwork keeps."""
    cfg = GPTConfig(**(SMALL | {"n_embd": 48} | kw))
    model = build_model(cfg)
    c, a, u, ln = corner_widths(cfg)
    hd = cfg.n_embd // cfg.n_head
    subs = [SubNetwork(model, corner(k, cfg.n_sources)) for k in range(cfg.n_sources)]
    assert max(s.width for s in subs) == c
    assert max(max(s.sub.heads) for s in subs) * hd == a
    assert max(s.sub.weights["transformer.h.0.mlp.c_fc.weight"].size(0) for s in subs) == u
    assert ln == (c if cfg.norm == "active" else cfg.n_embd)


def test_training_estimates_grow_as_they_should():
    cfg, t = recipe()
    base = training_parts(cfg, t)
    double = training_parts(cfg, dataclasses.replace(t, batch_size=2 * t.batch_size))
    assert double["activations"] == pytest.approx(2 * base["activations"], rel=0.02)
    assert double["logits"] == 2 * base["logits"] and double["weights"] == base["weights"]
    # micro-batches free their activations: grad_accum does not add
    assert training_bytes(cfg, dataclasses.replace(t, grad_accum=8)) == training_bytes(cfg, t)
    wider = training_parts(dataclasses.replace(cfg, n_embd=256), t)
    assert wider["weights"] > 3 * base["weights"] and wider["activations"] > 1.8 * base["activations"]
    deeper = training_parts(dataclasses.replace(cfg, n_layer=8), t)
    assert deeper["activations"] > 1.8 * base["activations"]
    assert training_parts(dataclasses.replace(cfg, vocab_size=650), t)["logits"] == 10 * base["logits"]
    # a row at full width (off the corners, or an ungated GPT) costs more than one at its corner's width
    assert training_bytes(cfg, dataclasses.replace(t, corner_fraction=0.0)) > training_bytes(cfg, t)
    assert training_bytes(dataclasses.replace(cfg, gates="none"), t) > training_bytes(cfg, t)
    # bf16 autocast saves activations; FSDP over 4 processes shards the weights and their state
    assert training_parts(cfg, dataclasses.replace(t, dtype="bfloat16"))["activations"] < base["activations"]
    sharded = training_parts(cfg, dataclasses.replace(t, fsdp=True), world=4)
    assert sharded["AdamW"] == pytest.approx(base["AdamW"] / 4, rel=0.01)


def test_a_bank_grows_with_its_sources():
    cfg, t = recipe("model.width=corner", "model.shared_fraction=0.25")
    two, eight = (training_parts(dataclasses.replace(cfg, n_sources=n), t) for n in (2, 8))
    assert eight["weights"] > 3 * two["weights"] and eight["AdamW"] > 3 * two["AdamW"]
    # absent sources have no gradients: a batch drawn from 2 sources holds 2 sources' worth
    few = training_parts(dataclasses.replace(cfg, n_sources=8), dataclasses.replace(t, sources_per_batch=2))
    assert few["gradients"] < eight["gradients"]
    step = training_parts(dataclasses.replace(cfg, n_sources=8),
                          dataclasses.replace(t, sources_per_batch=2, absent_sources="step"))
    assert step["gradients"] == eight["gradients"]


def test_generation_estimates_grow_as_they_should():
    cfg, _ = recipe(vocab=65)
    at = torch.tensor([[1.0, 0.0]])
    one, many = (generation_parts(cfg, n, 10, 50, at.expand(n, -1), "mixture") for n in (1, 64))
    assert many["KV cache"] == 64 * one["KV cache"] and many["sub-networks"] == one["sub-networks"]
    middle = torch.tensor([[0.5, 0.5]]).expand(64, -1)
    # tokens runs both corners on every row; gates runs the whole network between them
    assert generation_parts(cfg, 64, 10, 50, middle, "tokens")["KV cache"] == 2 * many["KV cache"]
    assert generation_parts(cfg, 64, 10, 50, middle, "gates")["KV cache"] == 2 * many["KV cache"]
    assert generation_parts(cfg, 64, 10, 50, middle, "mixture")["prompt"] > many["prompt"]  # scored at each corner
    ungated = dataclasses.replace(cfg, gates="none")
    assert generation_bytes(ungated, 64, 10, 50, weights=True) - generation_bytes(ungated, 64, 10, 50) == \
        4 * param_counts(ungated)[0]


def test_an_absurd_size_is_refused_without_allocating(monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    cfg, t = recipe("model.n_embd=65536", "model.n_layer=48", "model.n_head=64")
    rss = psutil.Process().memory_info().rss
    parts = training_parts(cfg, t, torch.device("cpu"))
    nbytes = sum(parts.values())
    with pytest.raises(AbcgptError) as e:
        require_memory(nbytes, "training", torch.device("cpu"), "train.batch_size or model.n_embd", parts)
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20  # the model was sized on the meta device
    msg = str(e.value)
    free, total = memory.device_memory("cpu")
    assert "\n" not in msg
    assert f"about {memory.fmt_bytes(nbytes)}" in msg and "TB" in msg  # ~2.5e12 parameters
    assert f"{memory.fmt_bytes(free)} free of {memory.fmt_bytes(total)}" in msg
    assert "reduce train.batch_size or model.n_embd" in msg and "AdamW" in msg
    # a size that fits passes; the escape hatch lets the absurd one try
    small_cfg, small_t = recipe()
    require_memory(training_bytes(small_cfg, small_t), "training", torch.device("cpu"))
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    require_memory(nbytes, "training", torch.device("cpu"))


def test_the_message_names_the_gpu(monkeypatch):
    """On CUDA the free memory is the driver's (torch.cuda.mem_get_info), faked here: no GPU needed."""
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    require_memory(2 * 10**9, "generation", torch.device("cuda:0"))
    with pytest.raises(AbcgptError, match=r"^generation needs about 5 GB but cuda:0 \(Fake GPU\) has 3 GB free of "
                                          r"80 GB: reduce n or max_new_tokens \(or set ABCGPT_SKIP"):
        require_memory(5 * 10**9, "generation", torch.device("cuda:0"), "n or max_new_tokens")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures the resident set through /proc")
def test_a_real_run_peaks_within_2x_of_its_estimate(tmp_path):
    """A few steps of a tiny-sized run (training, evaluation and checkpoint, in a fresh process): its peak RSS above
    the process's after imports and data loading is within 2x of the estimate."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory_estimate.py"), "--child", "train",
                          "tiny", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["measured"] > 50 * 2**20  # the activations of 32 x 128 tokens: the run did allocate them
    assert 0.5 <= r["estimate"] / r["measured"] <= 2.0, r
