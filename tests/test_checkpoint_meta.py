"""Nothing in a checkpoint's config.json is trusted as written: every hostile edit of it ends in one AbcgptError
naming the key, for every command that reads a checkpoint (info, sample, sample --calibrated, serve), and never in
a traceback, a 500 or a read outside the checkpoint."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abcgpt.checkpoint import load_checkpoint, meta_json
from abcgpt.cli import main
from abcgpt.common import AbcgptError
from abcgpt.config import load_recipe
from abcgpt.serve import create_app
from abcgpt.train import train

# a well-formed calibration, shaped as report.calibrate stores it, for the edits below to break
CALIBRATION = {"share": [0.1, 0.5, 0.9], "dial": [0.0, 0.5, 1.0], "mode": "switch",
               "curve": {"dial": [0.0, 0.5, 1.0], "share": [0.1, 0.5, 0.9]}, "samples_per_point": 6,
               "new_tokens": 40, "classifier_accuracy": 0.95}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A small trained checkpoint (last/: metrics, optimizer state) with a calibration added."""
    tmp = tmp_path_factory.mktemp("meta")
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3"]),
          tmp / "run", progress=False)
    ckpt = tmp / "run" / "last"
    meta = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(meta | {"calibration": CALIBRATION}))
    return ckpt


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def write_meta(ckpt: Path, meta: dict) -> None:
    (ckpt / "config.json").write_text(json.dumps(meta, allow_nan=True))  # NaN and Infinity as Python writes them


def edit(*path, value=None, delete: bool = False):
    """An edit that sets (or deletes) meta[path[0]][path[1]]..."""
    def apply(meta: dict) -> None:
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return apply


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


NAN, INF = float("nan"), float("inf")
HOSTILE = {  # id: (edit, a word the error must name)
    "three-sources-on-a-two-source-model": (edit("sources", value=["alpha", "omega", "beta"]), "sources"),
    "duplicate-source": (edit("sources", value=["alpha", "alpha"]), "sources"),
    "source-name-a-path": (edit("sources", 1, value="../x"), "sources.1"),
    "source-name-reserved": (edit("sources", 1, value="uniform"), "sources.1"),
    "source-name-a-number": (edit("sources", 1, value=7), "sources.1"),
    "one-source": (edit("sources", value=["alpha"]), "sources"),
    "sources-swapped": (edit("sources", value=["omega", "alpha"]), "recipe.data.sources"),
    "step-negative": (edit("step", value=-1), "step"),
    "step-float": (edit("step", value=6.0), "step"),
    "step-string": (edit("step", value="6"), "step"),
    "step-bool": (edit("step", value=True), "step"),
    "step-missing": (edit("step", delete=True), "step"),
    "num-params-negative": (edit("num_params", value=-5), "num_params"),
    "unknown-top-level-key": (edit("evil", value=1), "evil"),
    "version-bool": (edit("version", value=True), "version"),
    "version-float": (edit("version", value=1.0), "version"),
    "metrics-a-list": (edit("metrics", value=[1, 2]), "metrics"),
    "metrics-heldout-a-string": (edit("metrics", "heldout", value="low"), "metrics.heldout"),
    "metrics-heldout-unknown-source": (edit("metrics", "heldout", "beta", value={"alpha": 1.0, "omega": 1.0}),
                                       "metrics.heldout"),
    "metrics-heldout-own-corner-missing": (edit("metrics", "heldout", "alpha", "alpha", delete=True),
                                           "metrics.heldout"),
    "metrics-heldout-loss-a-string": (edit("metrics", "heldout", "alpha", "alpha", value="2.7"),
                                      "metrics.heldout.alpha.alpha"),
    "metrics-heldout-loss-nan": (edit("metrics", "heldout", "omega", "omega", value=NAN),
                                 "metrics.heldout.omega.omega"),
    "metrics-corner-own-inf": (edit("metrics", "corner_own", value=INF), "metrics.corner_own"),
    "metrics-unknown-key": (edit("metrics", "bogus", value=1), "metrics.bogus"),
    "calibration-a-string": (edit("calibration", value="yes"), "calibration"),
    "calibration-empty": (edit("calibration", value={}), "calibration.share"),
    "calibration-without-share": (edit("calibration", "share", delete=True), "calibration.share"),
    "calibration-share-a-number": (edit("calibration", "share", value=0.5), "calibration.share"),
    "calibration-one-knot": (edit("calibration", value=CALIBRATION | {"share": [0.5], "dial": [0.5]}),
                             "calibration.share"),
    "calibration-share-above-1": (edit("calibration", "share", 2, value=1.5), "calibration.share.2"),
    "calibration-dial-nan": (edit("calibration", "dial", 0, value=NAN), "calibration.dial.0"),
    "calibration-dial-a-string": (edit("calibration", "dial", 1, value="0.5"), "calibration.dial.1"),
    "calibration-lengths-differ": (edit("calibration", "dial", value=[0.0, 1.0]), "calibration"),
    "calibration-share-decreasing": (edit("calibration", "share", value=[0.9, 0.5, 0.1]), "calibration"),
    "calibration-mode-unknown": (edit("calibration", "mode", value="bogus"), "calibration.mode"),
    "calibration-mode-null": (edit("calibration", "mode", value=None), "calibration.mode"),
    "calibration-curve-inf": (edit("calibration", "curve", "share", 0, value=INF), "calibration.curve.share.0"),
    "calibration-unknown-key": (edit("calibration", "bogus", value=1), "calibration.bogus"),
    "files-path-traversal": (edit("files", "../../etc/passwd", value=sha("x")), "../../etc/passwd"),
    "files-absolute-path": (edit("files", "/etc/passwd", value=sha("x")), "/etc/passwd"),
    "files-without-model": (edit("files", "model.safetensors", delete=True), "files"),
    "files-digest-not-hex": (edit("files", "model.safetensors", value="z" * 64), "files.model.safetensors"),
    "files-a-list": (edit("files", value=["model.safetensors"]), "files"),
    "recipe-source-names-differ": (edit("recipe", "data", "sources", 1, "name", value="beta"),
                                   "recipe.data.sources"),
    "recipe-value-out-of-range": (edit("recipe", "train", "lr", value=-1.0), "lr"),
    "recipe-unknown-key": (edit("recipe", "train", "bogus", value=1), "bogus"),
    "recipe-without-model": (edit("recipe", "model", delete=True), "recipe.model"),
    "recipe-name-a-number": (edit("recipe", "name", value=5), "recipe.name"),
    "model-n-sources-mismatch": (edit("recipe", "model", "n_sources", value=3), "model.n_sources"),
    "model-n-head-0": (edit("recipe", "model", "n_head", value=0), "model.n_head"),
    "model-without-vocab": (edit("recipe", "model", "vocab_size", delete=True), "vocab_size"),
    "model-unknown-key": (edit("recipe", "model", "bogus", value=1), "bogus"),
    "model-vocab-below-tokenizer": (edit("recipe", "model", "vocab_size", value=2), "model.vocab_size"),
    "model-a-list": (edit("recipe", "model", value=[]), "model"),
    "legacy-model-a-list": (edit("model", value=[]), "model"),
    "tokenizer-vocab-wrong": (edit("tokenizer", "vocab_size", value=99), "tokenizer"),
    "tokenizer-kind-wrong": (edit("tokenizer", "kind", value="bpe"), "tokenizer"),
    "tokenizer-file-a-path": (edit("tokenizer", "file", value="../tokenizer.json"), "tokenizer.file"),
    "trainer-best-nan": (edit("trainer", "best", value=NAN), "trainer.best"),
    "trainer-rng-state-negative": (edit("trainer", "batcher", "state", "inc", value=-1),
                                   "trainer.batcher.state.inc"),
    "trainer-betas-a-string": (edit("trainer", "optimizer", "param_groups", 0, "betas", value="ab"),
                               "trainer.optimizer.param_groups.0.betas"),
}


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("abcgpt: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_untouched_checkpoint_loads_and_samples_calibrated(pristine, capsys):
    """The baseline: every command below succeeds on the checkpoint as written."""
    assert load_checkpoint(pristine).meta.calibration.mode == "switch"
    for argv in (["info", "--ckpt", str(pristine)],
                 ["sample", "--ckpt", str(pristine), "--max-new-tokens", "3"],
                 ["sample", "--ckpt", str(pristine), "--calibrated", "--dial", "0.5", "--max-new-tokens", "3"]):
        assert main(argv) == 0, capsys.readouterr().err
    create_app(pristine)


@pytest.mark.parametrize("tamper, key", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_config_is_one_error_naming_the_key(ckpt, capsys, tamper, key):
    meta = json.loads((ckpt / "config.json").read_text())
    tamper(meta)
    write_meta(ckpt, meta)
    with pytest.raises(AbcgptError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(ckpt) in msg and key in msg, msg
    for argv in (["info", "--ckpt", str(ckpt)],
                 ["sample", "--ckpt", str(ckpt), "--max-new-tokens", "3"],
                 ["sample", "--ckpt", str(ckpt), "--calibrated", "--dial", "0.5", "--max-new-tokens", "3"]):
        assert key in _refused(capsys, argv)
    with pytest.raises(AbcgptError):  # serve never starts, so it never answers 500
        create_app(ckpt)


def test_file_outside_the_checkpoint_is_never_read(ckpt, tmp_path):
    """A files entry naming a file outside the checkpoint, with that file's true sha256, is refused for its name:
    the hash check never opens it."""
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    for name in ("../secret", str(secret)):
        meta = json.loads((ckpt / "config.json").read_text())
        meta["files"][name] = sha("not yours")
        write_meta(ckpt, meta)
        with pytest.raises(AbcgptError, match="files has a key"):
            load_checkpoint(ckpt)


def test_older_checkpoints_still_load(ckpt):
    """What an older abcgpt wrote: the model config stored beside the recipe (whose model table lacked the
    vocabulary and the number of sources), no model.method (read from the stored specialties), a calibration
    without its mode (gates), and no metrics, calibration or trainer at all."""
    meta = json.loads((ckpt / "config.json").read_text())
    old = copy.deepcopy(meta)
    old["model"] = {k: old["recipe"]["model"].pop(k) for k in ("vocab_size", "n_sources")}
    del old["recipe"]["model"]["method"]
    del old["calibration"]["mode"], old["calibration"]["curve"]
    write_meta(ckpt, old)
    loaded = load_checkpoint(ckpt)
    assert loaded.model.config.method == "partition" and loaded.meta.calibration.mode == "gates"  # the schema's
    assert loaded.model.config.n_sources == 2 and loaded.meta.recipe.model["n_sources"] == 2
    written = json.loads(meta_json(loaded.meta))  # written back as read: no key filled in by a default
    assert "model" not in written and "mode" not in written["calibration"]
    for key in ("metrics", "calibration", "trainer"):
        del meta[key]
    write_meta(ckpt, meta)
    assert load_checkpoint(ckpt).meta.step == 6


def _sample(ckpt: Path, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sample", "--ckpt", str(ckpt), "--seed", "0", "--max-new-tokens", "20", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.mark.parametrize("method", ["partition", "reference"])
def test_a_deleted_key_is_derived_or_refused_never_guessed(tmp_path, capsys, method):
    """Delete each key of a real config.json, one at a time: the checkpoint then samples the same text for a fixed
    seed as before (the key was derived from what is stored, or is not needed), or is refused in one line naming
    it. Deleting model.method from a partition run made it load as the original method and print noise."""
    tmp = tmp_path / "w"
    tmp.mkdir()
    train(load_recipe(str(write_recipe(tmp)), ["train.steps=6", "train.checkpoint_every=3"], method), tmp / "run",
          progress=False)
    ckpt, _ = tmp / "run" / "last", capsys.readouterr()
    meta = json.loads((ckpt / "config.json").read_text())
    write_meta(ckpt, meta | {"calibration": CALIBRATION | {"mode": "switch"}})
    meta = json.loads((ckpt / "config.json").read_text())
    cases = [["--dial", "0.5"], ["--dial", "0.5", "--mode", "switch", "--calibrated"], ["--dial", "0.3", "--mode",
                                                                                           "gates"]]
    before = [_sample(ckpt, capsys, *c) for c in cases]
    assert all(code == 0 for code, _, _ in before)
    keys = [p for p in _paths(meta) if p[0] not in ("files", "metrics", "trainer") and not isinstance(p[-1], int)]
    assert len(keys) > 60 and ("recipe", "model", "method") in keys
    derived = []
    for key in keys:
        edit(*key, delete=True)(edited := copy.deepcopy(meta))
        write_meta(ckpt, edited)
        for (_, out0, _), case in zip(before, cases):
            code, out, err = _sample(ckpt, capsys, *case)
            assert (code == 0 and out == out0) or (code == 2 and len(err.splitlines()) == 1), (key, case, err)
        if key == ("recipe", "model", "method"):
            derived.append(code == 0)
    assert derived == [True]  # read from the specialties, not refused
    write_meta(ckpt, meta)


def _paths(value, prefix=()) -> list[tuple]:
    """Every key (and list index) of a JSON value, as paths from its root."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for k, v in items for p in [(*prefix, k), *_paths(v, (*prefix, k))]]


@pytest.fixture(scope="module")
def scratch(pristine, tmp_path_factory) -> tuple[Path, dict, list]:
    ckpt = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("fuzz") / "ckpt"))
    meta = json.loads((ckpt / "config.json").read_text())
    return ckpt, meta, _paths(meta)


LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, -1, 2**63, 10**40])
          | st.floats() | st.text(max_size=12) | st.sampled_from(["alpha", "omega", "../x", "gates", "middle"]))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=8)
DELETE = object()


@settings(max_examples=100, deadline=None,  # capsys is read out after every example
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_edits_load_or_raise_one_error(scratch, capsys, data):
    """Any one key of config.json replaced by any JSON value (or deleted): load_checkpoint loads or raises an
    AbcgptError, never anything else; what loads works in info and sample --calibrated."""
    ckpt, pristine_meta, paths = scratch
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON | st.just(DELETE))
    meta = copy.deepcopy(pristine_meta)
    edit(*path, value=value, delete=value is DELETE)(meta)
    write_meta(ckpt, meta)
    try:
        load_checkpoint(ckpt)
    except AbcgptError as e:
        assert len(str(e).splitlines()) == 1, e
        return
    capsys.readouterr()
    assert main(["info", "--ckpt", str(ckpt)]) == 0, capsys.readouterr().err
    code = main(["sample", "--ckpt", str(ckpt), "--calibrated", "--dial", "0.5", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and "calibrat" in err), err  # what loads samples, or lacks a calibration
