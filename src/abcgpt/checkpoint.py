"""Checkpoints: one directory, written atomically, nothing in it ever unpickled.

    model.safetensors      weights and the frozen specialties
    config.json            recipe, model config, source names and order, tokenizer, step, metrics, file hashes
    tokenizer.json         the tokenizer the model was trained with
    optimizer.safetensors  AdamW moments and the RNG states (training checkpoints only, for exact resume)

Nothing in config.json is trusted as written: on load it is checked against the schema below (its recipe and model
tables against their own declarations), then against the files and itself, before any of it is used. Anything
malformed is one AbcgptError naming the checkpoint, the key and what is allowed.
"""

import dataclasses
import hashlib
import json
import math
import reprlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from abcgpt.common import (
    DECLARED,
    AbcgptError,
    atomic_dir,
    atomic_write_text,
    declared,
    existing_dir,
    interrupts_deferred,
    not_a_file,
    validation_message,
)
from abcgpt.config import DERIVED, SECTIONS, Recipe, declared_keys, recipe_from_dict
from abcgpt.dial import MODES
from abcgpt.model import GPT, GPTConfig, build_model
from abcgpt.sources import check_source_name
from abcgpt.tokenizer import Tokenizer, load_tokenizer

FORMAT = "abcgpt-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    recipe: Recipe
    tokenizer: Tokenizer
    meta: "Meta"  # config.json, parsed once (and checked) on load

    @property
    def sources(self) -> list[str]:
        return self.meta.sources

    @property
    def run(self) -> Path | None:
        """The run folder this checkpoint is the best/ or last/ of, if it is one."""
        return self.path.parent if self.path.name in ("best", "last") else None


# ----------------------------------------------------------------------------- config.json's schema


def _source_name(name: str) -> str:
    try:
        check_source_name(name)
    except AbcgptError as e:
        raise ValueError(str(e)) from None  # pydantic reports a ValueError with its key
    return name


SourceName = Annotated[str, AfterValidator(_source_name)]
# files are read as checkpoint/name: a plain file name of the folder, never a path out of it
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=255)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
U128 = Annotated[int, Field(ge=0, lt=2**128)]


class TokenizerEntry(BaseModel):
    model_config = DECLARED
    kind: Literal["char", "bpe"]
    vocab_size: Positive
    file: Literal["tokenizer.json"]


class RecipeEntry(BaseModel):
    """Its tables' keys and values are checked by config.recipe_from_dict."""
    model_config = DECLARED
    name: str = Field(min_length=1)
    data: dict
    model: dict
    train: dict


class Metrics(BaseModel):
    """What training stores: the last evaluation's held-out loss at each source's corner and the middle."""
    model_config = DECLARED
    heldout: dict[str, dict[str, float]] | None = None  # {dial position: {source: loss}}
    corner_own: float | None = None


class Curve(BaseModel):
    model_config = DECLARED
    dial: list[Unit]
    share: list[Unit]


class Calibration(BaseModel):
    """What report.calibrate stores: the knots share -> dial that style.apply_calibration interpolates, the mode
    they were measured in, and how."""
    model_config = DECLARED
    share: list[Unit] = Field(min_length=2)
    dial: list[Unit] = Field(min_length=2)
    mode: Literal[MODES] = "gates"  # stored before there were modes: measured through the gates
    curve: Curve | None = None
    samples_per_point: Positive | None = None
    new_tokens: Positive | None = None
    classifier_accuracy: Unit | None = None

    @model_validator(mode="after")
    def knots(self) -> "Calibration":
        if len(self.share) != len(self.dial):
            raise ValueError(f"share and dial must have the same length, not {len(self.share)} and {len(self.dial)}")
        if self.share != sorted(self.share):
            raise ValueError("share must be non-decreasing: the knots of an interpolation, in order")
        if self.curve and len(self.curve.dial) != len(self.curve.share):
            raise ValueError("curve.dial and curve.share must have the same length")
        return self


class ParamGroup(BaseModel):
    model_config = DECLARED | {"extra": "allow"}  # another torch version may store other AdamW options
    params: list[Count]
    lr: float = Field(ge=0.0)
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(min_length=2, max_length=2)
    eps: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)


class OptimizerEntry(BaseModel):
    model_config = DECLARED
    param_groups: list[ParamGroup]
    scalars: dict[Annotated[str, Field(pattern=r"^[0-9]+\.[A-Za-z_]+$")], float]  # "param index.name": value


class PCG64State(BaseModel):
    model_config = DECLARED
    state: U128
    inc: U128


class BatcherEntry(BaseModel):
    """numpy's PCG64 state, as data.Batcher.state returns it."""
    model_config = DECLARED
    bit_generator: Literal["PCG64"]
    state: PCG64State
    has_uint32: int = Field(ge=0, le=1)
    uinteger: int = Field(ge=0, lt=2**32)


class TrainerState(BaseModel):
    """What restore_training_state and train read to resume."""
    model_config = DECLARED
    optimizer: OptimizerEntry | None = None
    batcher: BatcherEntry | None = None
    best: Annotated[float, Field(ge=0.0, allow_inf_nan=True)] | None = None  # inf until the first evaluation


class Edit(BaseModel):
    """A source removed from or added to a trained model (`abcgpt forget`, `abcgpt add-source`: sources_edit.py)."""
    model_config = DECLARED
    removed: SourceName | None = None
    added: SourceName | None = None
    how: str = Field(min_length=1, max_length=4000)
    steps: Count | None = None  # the steps it trained for, if it trained
    from_model: Sha256  # the sha256 of the model.safetensors it was made from

    @model_validator(mode="after")
    def one_source(self) -> "Edit":
        if (self.removed is None) == (self.added is None):
            raise ValueError("an edit names exactly one of removed and added")
        return self


class Meta(BaseModel):
    """config.json."""
    model_config = DECLARED
    format: Literal[FORMAT]
    version: Literal[VERSION]
    step: Count
    sources: list[SourceName] = Field(min_length=2)
    recipe: RecipeEntry
    tokenizer: TokenizerEntry
    num_params: Count
    metrics: Metrics | None = None
    calibration: Calibration | None = None
    trainer: TrainerState | None = None
    edits: list[Edit] | None = None  # sources removed or added after training, in order (absent: none)
    files: dict[FileName, Sha256]

    @field_validator("sources")
    @classmethod
    def unique(cls, sources: list[str]) -> list[str]:
        dup = sorted(s for s, n in Counter(sources).items() if n > 1)
        if dup:
            raise ValueError(f"{dup[0]!r} is listed twice")
        return sources

    @field_validator("files")
    @classmethod
    def complete(cls, files: dict[str, str]) -> dict[str, str]:
        if not {"model.safetensors", "tokenizer.json"} <= files.keys():
            raise ValueError("must list the sha256 of model.safetensors and tokenizer.json")
        return files

    @model_validator(mode="after")
    def consistent(self) -> "Meta":
        heldout = self.metrics.heldout if self.metrics else None
        if heldout is not None:
            known = set(self.sources)
            if (not heldout.keys() <= known | {"middle"} or any(not row.keys() <= known for row in heldout.values())
                    or any(s not in heldout.get(s, {}) for s in self.sources)):
                raise ValueError(f"metrics.heldout must hold a loss for each of sources ({', '.join(self.sources)}) "
                                 "at its own corner, and may hold others at the corners and the middle")
        if self.trainer and self.trainer.optimizer and "optimizer.safetensors" not in self.files:
            raise ValueError("trainer.optimizer is set but files does not list optimizer.safetensors")
        return self


def inside(path: Path, name: str) -> Path:
    """path/name, refused if it is a link that leads out of the checkpoint folder (a file planted to be read)."""
    f = path / name
    if f.is_symlink() and f.resolve().parent != path.resolve():
        raise AbcgptError(f"checkpoint {path}: {name} is a link to {f.resolve()}, outside the checkpoint folder; "
                          "abcgpt does not read it")
    return f


def checkpoint_files(folder: Path) -> set[str] | None:
    """The files of a checkpoint written before outputs were marked: config.json and those it lists."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        return None
    return {"config.json", *meta["files"]}


def read_meta(path: Path) -> Meta:
    """path/config.json, parsed into Meta (its schema's defaults filled in): the one place config.json is read."""
    try:
        meta = json.loads(inside(path, "config.json").read_text())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep, an integer of 5000 digits
        raise AbcgptError(f"{path}/config.json is corrupted: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AbcgptError(f"{path} is not an abcgpt checkpoint (config.json has no format: {FORMAT!r})")
    version = meta.get("version")
    if type(version) is not int or version != VERSION:  # (True == 1.0 == 1 in Python)
        raise AbcgptError(f"{path} is checkpoint version {reprlib.repr(version)}; this abcgpt reads {VERSION}")
    try:
        return Meta.model_validate(migrate(meta, path))
    except ValidationError as e:
        raise _malformed(path, validation_message(e)) from None


def meta_json(meta: Meta) -> str:
    """config.json's text for a Meta: the keys it was read with (or set since), nothing filled in by defaults."""
    return json.dumps(meta.model_dump(exclude_unset=True), indent=2)


# recipe keys added after runs were saved, each with the value every run saved before it trained with
ADDED_KEYS = {"train": {"own_decay_factor": 1.0, "branch_step": 0}}


def migrate(meta: dict, path: Path) -> dict:
    """config.json as this abcgpt writes it (in place; nanochat's _patch_missing_config_keys), never by guessing:
    - the model config was stored twice, beside the recipe: its values join the recipe's model table;
    - model.method, when missing, is read from the specialties the weights store (the methods' differ);
    - a key added since (ADDED_KEYS) takes the value that every run saved without it had;
    - any other recipe key that is missing is refused by name: a default could change what the model computes
      (n_head, a gate's shape) or how a resumed run trains (its lr, its seed)."""
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict) or not all(isinstance(recipe.get(k), dict) for k in SECTIONS):
        return meta  # the schema says what is wrong
    if isinstance(meta.get("model"), dict):
        recipe["model"] = meta.pop("model") | recipe["model"]
    if "method" not in recipe["model"]:
        recipe["model"]["method"] = stored_method(path)
    for section in SECTIONS:
        recipe[section] = ADDED_KEYS.get(section, {}) | recipe[section]
        missing = [k for k in declared_keys(section) if k not in recipe[section]]
        if missing:
            raise _malformed(path, f"recipe.{section}.{missing[0]} is missing; abcgpt does not guess it (add it "
                                   "with the value the run was trained with)")
    return meta


def stored_method(path: Path) -> str:
    """The dial method whose specialties model.safetensors holds: partition's are one-hot rows (or, for shared
    units, all 1/N), the original method's are drawn from a Beta (Dirichlet) distribution."""
    try:
        with safe_open(str(inside(path, "model.safetensors")), "pt") as f:
            m = f.get_tensor("specialties") if "specialties" in f.keys() else None
    except (SafetensorError, OSError) as e:
        raise _malformed(path, f"recipe.model.method is missing, and model.safetensors cannot tell it ({e})") \
            from None
    if m is None or m.dim() != 2 or not m.numel():
        raise _malformed(path, "recipe.model.method is missing, and model.safetensors holds no specialties to "
                               "tell it")
    partition = ((m == 0) | (m == 1) | ((m - 1.0 / m.size(1)).abs() < 1e-6)).all()
    return "partition" if partition else "reference"


def _malformed(path: Path, why: str) -> AbcgptError:
    return AbcgptError(" ".join(f"checkpoint {path} has a malformed config.json: {why}".split()))


# ----------------------------------------------------------------------------- writing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, model: GPT, recipe: Recipe, tokenizer: Tokenizer, sources: list[str],
                    step: int, metrics: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    trainer: dict | None = None, edits: "list[Edit | dict] | None" = None) -> None:
    """Write into a temporary beside path, fsync, then swap it in: a crash at any moment leaves a complete checkpoint.
    The caller holds the run's lock."""
    with interrupts_deferred(), atomic_dir(Path(path), "checkpoint", checkpoint_files, lock=False) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding / LM head
        tokenizer.save(tmp / "tokenizer.json")
        if optimizer is not None:
            tensors, state_meta = _flatten_optimizer(optimizer)
            tensors["rng.torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda.{i}"] = s
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            trainer = dict(trainer or {}, optimizer=state_meta)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "sources": sources,
            # the recipe once, its model table with what the data decided (vocabulary, number of sources)
            "recipe": recipe.to_dict() | {"model": dataclasses.asdict(model.config)},
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "file": "tokenizer.json"},
            "num_params": model.num_params(),
            "metrics": metrics or {},
            "trainer": trainer,
            # (only an edited model's config.json has the key; a stored edit is written back as it was read)
            **({"edits": [e.model_dump(exclude_unset=True) if isinstance(e, Edit) else e for e in edits]}
               if edits else {}),
            "files": {f.name: sha256(f) for f in sorted(tmp.iterdir())},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))  # last: it holds the others' hashes


def write_calibration(ckpt: "Checkpoint", calibration: dict) -> list[Path]:
    """Store a calibration in the checkpoint's config.json, and in its run's other checkpoint (best/, last/) when
    that one holds the same weights: a calibration belongs to weights, and a run's last/ outlives its best/ (a
    resumed run replaces best/). Returns the checkpoints written."""
    calibration = Calibration.model_validate(calibration)
    digest = ckpt.meta.files["model.safetensors"]
    targets = [(ckpt.path, ckpt.meta)]
    if ckpt.run is not None:
        other = existing_dir(ckpt.path.with_name("last" if ckpt.path.name == "best" else "best"))
        if (other / "config.json").is_file():
            meta = read_meta(other)
            if meta.files["model.safetensors"] == digest:
                targets.append((other, meta))
    for path, meta in targets:
        atomic_write_text(path / "config.json", meta_json(meta.model_copy(update={"calibration": calibration})))
    return [path for path, _ in targets]


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_training_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> dict:
    """Load optimizer moments and RNG states into place; returns the trainer's own state (batcher, best)."""
    trainer = ckpt.meta.trainer or TrainerState()
    f = ckpt.path / "optimizer.safetensors"
    if trainer.optimizer is None or trainer.batcher is None or trainer.best is None or not f.is_file():
        raise AbcgptError(f"{ckpt.path} holds no optimizer state (not a training checkpoint): cannot resume")
    tensors = _load_tensors(f)
    try:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                if k.startswith("exp_avg") and v.shape != params[int(i)].shape:
                    raise ValueError(f"{key} has shape {tuple(v.shape)}, its parameter {tuple(params[int(i)].shape)}")
                state.setdefault(int(i), {})[k] = v
        for key, v in trainer.optimizer.scalars.items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        groups = [g.model_dump() | {"betas": tuple(g.betas)} for g in trainer.optimizer.param_groups]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise AbcgptError(f"{f} does not hold a usable optimizer state ({type(e).__name__}: {e}): cannot resume "
                          "from it") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return {"batcher": trainer.batcher.model_dump(), "best": trainer.best}


def _load_tensors(f: Path) -> dict:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise AbcgptError(f"{f} is corrupted: {e}") from None


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run directory: its best checkpoint, else its last."""
    try:
        path = existing_dir(Path(path))
        there = path.exists()
    except OSError as e:  # a name too long for the system
        raise AbcgptError(f"checkpoint {reprlib.repr(str(path))}: {e.strerror}") from None
    if not there:
        raise AbcgptError(f"checkpoint {path} does not exist")
    if not path.is_dir() and not path.is_file():  # a FIFO, a device: named, never opened
        raise AbcgptError(f"checkpoint {path} {not_a_file(path)}")
    for candidate in (path, path / "best", path / "last"):
        candidate = existing_dir(candidate)
        if (candidate / "config.json").is_file():
            return candidate
    raise AbcgptError(f"{path} is not an abcgpt checkpoint or run directory (no config.json in it, "
                      "nor in best/ or last/)")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint (or a run directory's best, else last), with every file checked before it is used."""
    path = resolve(path)
    meta = read_meta(path)
    for name, digest in meta.files.items():  # plain file names (checked): nothing outside path is read
        f = inside(path, name)
        if not f.is_file():
            raise AbcgptError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256(f) != digest:
            raise AbcgptError(f"checkpoint {path} is corrupted: {name} does not match its recorded sha256")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    entry = meta.tokenizer
    if (tokenizer.kind, tokenizer.vocab_size) != (entry.kind, entry.vocab_size):
        raise _malformed(path, f"tokenizer says {entry.kind} with {entry.vocab_size} tokens, tokenizer.json "
                               f"holds {tokenizer.kind} with {tokenizer.vocab_size}")
    recipe = _recipe(path, meta)
    try:  # and what the data decided: the vocabulary and the number of sources
        with declared("recipe.model."):
            config = dataclasses.replace(recipe.model, **{k: meta.recipe.model.get(k) for k in DERIVED["model"]})
    except AbcgptError as e:
        raise _malformed(path, str(e)) from None
    _check_agreement(path, meta, recipe, config, tokenizer)
    try:
        # the size first, on no memory: config.json cannot make us allocate more than its weights file holds
        with torch.device("meta"):
            need = sum(p.numel() for p in build_model(config).parameters())
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            have = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        if need > have:
            raise ValueError(f"its model has {need:,} parameters, model.safetensors holds {have:,} numbers")
        model = build_model(config)
        load_model(model, str(path / "model.safetensors"), strict=True)  # onto the CPU model; moved once below
    except (SafetensorError, RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise AbcgptError(" ".join(f"checkpoint {path} cannot be loaded ({type(e).__name__}): {e}".split())) from None
    return Checkpoint(path, model.to(device), recipe, tokenizer, meta)


def read_recipe(path: Path) -> Recipe:
    """A checkpoint's recipe alone, from its config.json (no weights read, no files hashed)."""
    path = resolve(path)
    return _recipe(path, read_meta(path))


def _recipe(path: Path, meta: Meta) -> Recipe:
    try:
        return recipe_from_dict(meta.recipe.model_dump())
    except AbcgptError as e:
        raise _malformed(path, f"recipe: {e}") from None


def _check_agreement(path: Path, meta: Meta, recipe: Recipe, config: GPTConfig, tokenizer: Tokenizer) -> None:
    """The parts of config.json that describe the same thing must say the same."""
    names = [s.name for s in recipe.data.sources]
    if names != meta.sources:
        raise _malformed(path, f"recipe.data.sources are {', '.join(names)}; sources are "
                               f"{', '.join(meta.sources)}: the same names, in the same order, are allowed")
    if config.n_sources != len(names):
        raise _malformed(path, f"recipe.model.n_sources = {config.n_sources}, but there are {len(names)} sources")
    if tokenizer.vocab_size > config.vocab_size:
        raise _malformed(path, f"recipe.model.vocab_size = {config.vocab_size}, but its tokenizer has "
                               f"{tokenizer.vocab_size} tokens: at least as many are allowed")
