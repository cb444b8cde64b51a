"""Recipes: TOML files with [data], [model] and [train] tables; any key overridable with --set key=value.

A recipe is a name (a file in abcgpt/configs/) or a path. Every key is declared once below (and [model] in
model.GPTConfig) with its type, its range and its default; unknown keys, wrong types and values out of range are
errors that name the key, the value and what is allowed, before any work starts."""

import bisect
import dataclasses
import sys
import tomllib
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from abcgpt.common import DECLARED, DEVICE, DIAL_KEY, RUN_KEY, AbcgptError, declared, not_a_file
from abcgpt.dial import fewest_own_units
from abcgpt.model import GPTConfig
from abcgpt.sources import SourceSpec

RECIPE_DIR = Path(__file__).parent / "configs"
BIG = 10**9  # a ceiling for counts of steps and batches: far above any real run, far below an overflow


@dataclass(config=DECLARED)
class DataConfig:
    dir: str = Field("data/{recipe}", min_length=1)  # where prepared shards go; {recipe} is the recipe's name
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = Field(4096, ge=257, le=2**20)  # BPE only: 256 bytes, the end-of-text token and merges
    heldout_fraction: float = Field(0.1, gt=0.0, le=0.5)  # held out from the end of a source without a validation file
    sources: list[SourceSpec] = Field(default_factory=list)  # checked by SourceSpec itself


@dataclass(config=DECLARED)
class TrainConfig:
    steps: int = Field(5000, ge=1, le=BIG)
    batch_size: int = Field(64, ge=1, le=2**20)
    grad_accum: int = Field(1, ge=1, le=2**16)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    min_lr: float = Field(1e-4, ge=0.0, le=10.0)  # and <= lr
    warmup_steps: int = Field(100, ge=0, le=BIG)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    # model.width = "corner": weight decay on each source's own units, as a multiple of weight_decay. A small
    # source's own units see its text many times and overfit; more decay leans its corner on the shared units
    own_decay_factor: float = Field(1.0, ge=0.0, le=100.0, json_schema_extra=DIAL_KEY)
    # model.width = "corner": the first branch_step steps train one network on every source (source 0's; the seed
    # phase of Branch-Train-Merge); then every source's own units start as copies of it. 0: none
    branch_step: int = Field(0, ge=0, le=BIG, json_schema_extra=DIAL_KEY)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, le=1e6)  # 0: no clipping
    # "per_batch" is the reference's: one dial per step
    dial_sampling: Literal["per_sequence", "per_batch"] = Field("per_sequence", json_schema_extra=DIAL_KEY)
    # dial ~ Beta(c, c) / Dirichlet(c)
    dial_concentration: float = Field(0.5, gt=0.0, le=1e6, json_schema_extra=DIAL_KEY)
    # share of draws put at an exact corner (one source alone); 1 = always
    corner_fraction: float = Field(1.0, ge=0.0, le=1.0, json_schema_extra=DIAL_KEY)
    # every draw at a corner: the sources of one batch are drawn from this many (0: each sequence its own); fewer
    # sources in a batch, fewer small forwards at many sources, the same share of each source
    sources_per_batch: int = Field(0, ge=0, le=2**20, json_schema_extra=DIAL_KEY)
    # model.width = "corner": AdamW "skip"s the parameters of sources absent from a batch (no gradient: moments and
    # weights stay, the step costs the batch's sources), or "step"s them all with a zero gradient (plain AdamW)
    absent_sources: Literal["skip", "step"] = "skip"
    # ungated baselines: train on these sources only ([] = all)
    only_sources: list[str] = Field(default_factory=list, json_schema_extra=DIAL_KEY)
    seed: int = Field(0, ge=0, le=2**63 - 1, json_schema_extra=RUN_KEY)
    device: str = Field("auto", pattern=DEVICE.pattern, json_schema_extra=RUN_KEY)  # auto, cpu, cuda, cuda:N, mps
    # auto: bf16 autocast on CUDA, else fp32
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", json_schema_extra=RUN_KEY)
    compile: bool = Field(False, json_schema_extra=RUN_KEY)
    # under torchrun: shard parameters, gradients and optimizer state (FSDP2), not DDP
    fsdp: bool = Field(False, json_schema_extra=RUN_KEY)
    # the accelerator's dense bf16 peak for MFU; 0: by GPU name
    peak_tflops: float = Field(0.0, ge=0.0, le=1e6, json_schema_extra=RUN_KEY)
    threads: int = Field(0, ge=0, le=4096, json_schema_extra=RUN_KEY)  # torch CPU threads; 0 leaves torch's default
    eval_every: int = Field(250, ge=1, le=BIG, json_schema_extra=RUN_KEY)
    # held-out batches per source per dial position
    eval_batches: int = Field(8, ge=1, le=10**5, json_schema_extra=RUN_KEY)
    log_every: int = Field(10, ge=1, le=BIG, json_schema_extra=RUN_KEY)
    # besides metrics.jsonl: "tensorboard", "wandb" (offline by default)
    log_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, json_schema_extra=RUN_KEY)
    checkpoint_every: int = Field(250, ge=1, le=BIG, json_schema_extra=RUN_KEY)


@dataclass
class Recipe:
    name: str
    data: DataConfig
    model: GPTConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"]["sources"] = [s.to_dict() for s in self.data.sources]
        return d

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir.format(recipe=self.name))


# keys the recipe does not set: they come from the data (vocabulary, number of sources)
DERIVED = {"model": {"vocab_size", "n_sources"}}
SECTIONS = {"data": DataConfig, "model": GPTConfig, "train": TrainConfig}


def declared_keys(section: str) -> dict:
    """The keys a recipe may set in a section, with their declarations (pydantic FieldInfo: default, range)."""
    return {k: f for k, f in SECTIONS[section].__pydantic_fields__.items() if k not in DERIVED.get(section, ())}


def keys_a_baseline_may_change() -> dict[str, set[str]]:
    """The dial's own keys and how a run executes (declared with DIAL_KEY / RUN_KEY): an ungated baseline may set
    them otherwise and still be compared with the dial model, which it must match in every other key."""
    return {section: {k for k, f in declared_keys(section).items() if f.json_schema_extra in (DIAL_KEY, RUN_KEY)}
            for section in SECTIONS}


def describe_keys() -> list[str]:
    """One line per recipe key: its type, what is allowed and its default (`abcgpt config --keys`)."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "pattern": "matches", "min_length": "length >="}

    def kind(t) -> str:
        if typing.get_origin(t) is Literal:
            return " | ".join(map(repr, typing.get_args(t)))
        if typing.get_origin(t) is list:
            return f"list of {kind(typing.get_args(t)[0])}"
        return t.__name__

    lines = []
    for section in SECTIONS:
        for key, f in declared_keys(section).items():
            limits = " ".join(f"{sign} {getattr(m, name)}" for m in f.metadata for name, sign in signs.items()
                              if getattr(m, name, None) is not None)
            default = "none (list two or more)" if key == "sources" else repr(f.get_default(call_default_factory=True))
            lines.append(f"{section + '.' + key:<30} {kind(f.annotation) + ' ' + limits:<52} default {default}")
    return lines


def build_recipe(raw: dict, name: str) -> Recipe:
    """Validate a parsed TOML dict and fill in defaults."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise AbcgptError(f"unknown table [{sorted(unknown)[0]}] in recipe {name}; allowed: data, model, train")
    for section in SECTIONS:
        if not isinstance(raw.get(section, {}), dict):
            raise AbcgptError(f"[{section}] in recipe {name} must be a table, got {raw[section]!r}")
    sections = {}
    for section, cls in SECTIONS.items():
        table = dict(raw.get(section, {}))
        keys = declared_keys(section)
        for key in table:
            if key not in keys:
                raise AbcgptError(f"unknown key {section}.{key} in recipe {name}; allowed: "
                                  f"{', '.join(f'{section}.{k}' for k in keys)}")
        if section == "data" and "sources" in table:
            if not isinstance(table["sources"], list):
                raise AbcgptError("data.sources must be a list of tables ([[data.sources]])")
            table["sources"] = [SourceSpec.from_dict(s) for s in table["sources"]]
        with declared(f"{section}."):
            sections[section] = cls(**table)
    recipe = Recipe(name=name, **sections)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """The rules that tie keys together (each key's own range is declared with it)."""
    names = [s.name for s in r.data.sources]
    if len(names) < 2:
        raise AbcgptError(f"recipe {r.name} lists {len(names)} source(s); a dial needs at least two")
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AbcgptError(f"source {sorted(dup)[0]!r} is listed twice in recipe {r.name}")
    m, t = r.model, r.train
    for name in t.only_sources:
        if name not in names:
            raise AbcgptError(f"train.only_sources names {name!r}, which is not a source of the recipe "
                              f"({', '.join(names)})")
    if t.only_sources and m.gates != "none":
        raise AbcgptError('train.only_sources is for ungated baselines: set model.gates = "none" too')
    if m.width == "corner" and m.gates == "abc":
        needs = {"model.method": (m.method, "partition"), "model.shared_gate": (m.shared_gate, "always"),
                 "train.corner_fraction": (t.corner_fraction, 1.0), "train.fsdp": (t.fsdp, False)}
        for key, (have, want) in needs.items():
            if have != want:
                raise AbcgptError(f'model.width = "corner" (each source its own network, nothing between the corners) '
                                  f"needs {key} = {want!r}, got {have!r}")
    if t.branch_step and (m.width != "corner" or m.gates != "abc"):
        raise AbcgptError('train.branch_step is for a bank of corners (model.width = "corner", model.gates = "abc"), '
                          'whose sources have units of their own to branch; leave it at 0')
    if t.own_decay_factor != 1.0 and m.width != "corner":
        raise AbcgptError('train.own_decay_factor is for a bank of corners (model.width = "corner"), whose sources '
                          'have units of their own; leave it at 1 or set model.width = "corner"')
    if m.shared_from != "all" and (m.width != "corner" or not m.shared_fraction):
        raise AbcgptError(f'model.shared_from = "{m.shared_from}" is for a bank of corners with shared units: it needs '
                          'model.width = "corner" and model.shared_fraction > 0')
    if t.sources_per_batch and (t.corner_fraction != 1.0 or t.dial_sampling != "per_sequence"):
        raise AbcgptError("train.sources_per_batch draws corners: it needs train.corner_fraction = 1 and "
                          'train.dial_sampling = "per_sequence"')
    if m.n_embd % m.n_head:
        raise AbcgptError(f"model.n_embd ({m.n_embd}) must be a multiple of model.n_head ({m.n_head})")
    if m.gates == "abc" and m.method == "partition":  # (the reference's units each serve every source)
        check_units(r.name, len(names), m)
    if t.min_lr > t.lr:
        raise AbcgptError(f"train.min_lr ({t.min_lr}) must not be above train.lr ({t.lr})")
    try:
        r.data_dir  # noqa: B018 (formats data.dir)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise AbcgptError(f"data.dir = {r.data.dir!r} is not allowed: the only placeholder it may hold is "
                          "{recipe} (write {{ and }} for braces)") from None


def check_units(recipe: str, n_sources: int, m: GPTConfig) -> None:
    """The partition method gives each unit to one source (or, model.shared_fraction of them, to all) and trains it
    on that source only: a source that owns no unit of a kind has a corner without it, whatever it trains on (with no
    residual channel it predicts uniformly, forever). So every source must own a residual channel, an attention head
    in each layer and an MLP unit. With model.width = "corner" each source has a network of its own, so each needs
    one of each that is not shared."""
    per = n_sources if m.width == "total" else 1

    def owned(size: int) -> bool:
        return fewest_own_units(size, per, m.shared_fraction) >= 1

    kinds = {"attention head in a layer": m.n_head, "residual channel": m.n_embd, "MLP unit": 4 * m.n_embd}
    lacking = [kind for kind, size in kinds.items() if not owned(size)]
    if not lacking:
        return
    # The smallest sizes that work, by bisection: a group's own units never shrink as it grows (its shared ones
    # grow by at most one per unit), and from `enough` on there are always enough. n_embd is a multiple of n_head.
    enough = int((per + 1) / (1 - m.shared_fraction)) + 2
    heads = 1 + bisect.bisect_left(range(1, enough), True, key=owned)
    embd = heads * (1 + bisect.bisect_left(range(1, enough), True,
                                           key=lambda k: owned(k * heads) and owned(4 * k * heads)))
    setting = f"{n_sources} sources, model.n_head = {m.n_head}, model.n_embd = {m.n_embd}"
    setting += f", model.shared_fraction = {m.shared_fraction}" if m.shared_fraction else ""
    setting += ', model.width = "corner"' if m.width == "corner" else ""
    most = next(x.le for x in GPTConfig.__pydantic_fields__["n_head"].metadata if getattr(x, "le", None))
    fixes = ["lower model.shared_fraction"] * bool(m.shared_fraction) + ['use model.width = "corner"'] * (per > 1)
    beyond = f", more than model.n_head's largest ({most}): {' or '.join(fixes)}" if heads > most else ""
    none = ", no ".join(lacking[:-1]) + " and no " * (len(lacking) > 1) + lacking[-1]
    raise AbcgptError(f"recipe {recipe} leaves some source no {none} of its own ({setting}): the partition method "
                      f"gives each unit to one source, and every source needs one of each kind: use model.n_head >= "
                      f"{heads} and model.n_embd >= {embd} ({4 * embd} MLP units){beyond}")


def parse_override(item: str) -> tuple[str, str, object]:
    """'train.lr=3e-4' (or 'lr=3e-4' when the key names one field) -> (section, key, value as TOML reads it)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise AbcgptError(f"--set takes key=value, got {item!r}")
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in declared_keys(section):
            raise AbcgptError(f"unknown config key {key!r}; see `abcgpt config --config NAME` for the keys")
    else:
        owners = [s for s in SECTIONS if key in declared_keys(s)]
        if not owners:
            raise AbcgptError(f"unknown config key {key!r}; see `abcgpt config --config NAME` for the keys")
        if len(owners) > 1:
            raise AbcgptError(f"{key!r} is ambiguous: say {' or '.join(f'{s}.{key}' for s in owners)}")
        section, name = owners[0], key
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        value = text.strip()  # bare words are strings: --set gates=none (the type check judges the rest)
    return section, name, value


RENAMED = {"reference": "original"}  # a recipe's old name: still read, with a note saying its new one


def load_recipe(config: str, overrides: list[str] = (), method: str | None = None) -> Recipe:
    """A recipe by name (abcgpt/configs/NAME.toml) or path. Its tables go over those of the file it names in
    `include` (if any); a method preset (abcgpt/configs/methods/NAME.toml) goes over the recipe; --set overrides
    go last."""
    if config in RENAMED:
        print(f"note: the recipe {config!r} is now called {RENAMED[config]!r}", file=sys.stderr)
        config = RENAMED[config]
    path = _toml_path(config, RECIPE_DIR, "recipe", list_recipes())
    raw = _read_toml(path)
    include = raw.pop("include", None)
    if include is not None:
        if not isinstance(include, str):
            raise AbcgptError(f"include in {path} must be the name of a file, got {include!r}")
        near = path.parent / include  # a file beside the recipe, else a built-in name like methods/reference
        found = near if near.suffix and near.is_file() else _toml_path(include, RECIPE_DIR, "include",
                                                                       list_recipes() + list_methods())
        raw = _merge(_read_toml(found), raw)
    if method is not None:
        raw = _merge(raw, read_method(method))
    for item in overrides:
        section, name, value = parse_override(item)
        raw.setdefault(section, {})[name] = value
    return build_recipe(raw, path.stem)


def read_method(name: str) -> dict:
    """A method preset: the [model] and [train] keys that make up one dial method (configs/methods/NAME.toml)."""
    raw = _read_toml(_toml_path(name, RECIPE_DIR / "methods", "method", list_methods()))
    if set(raw) - {"model", "train"}:
        raise AbcgptError(f"a method preset sets [model] and [train] keys only; method {name} has "
                          f"{', '.join(sorted(set(raw) - {'model', 'train'}))}")
    return raw


def _toml_path(name: str, folder: Path, what: str, known: list[str]) -> Path:
    """NAME (a built-in file in folder, may name a subfolder: methods/reference) or a path to a .toml file."""
    path = Path(name)
    if not path.suffix:
        path = folder / f"{name}.toml"
        if not path.is_file():
            raise AbcgptError(f"unknown {what} {name!r}; built-in: {', '.join(known)}, or give a path to a .toml file")
    if not path.is_file():
        raise AbcgptError(f"{what} file {path} {not_a_file(path)}")
    return path


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AbcgptError(f"{path} is not valid TOML: {e}") from None


def _merge(under: dict, over: dict) -> dict:
    """Tables of `over` on top of those of `under`, key by key."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in under.items()}
    for k, v in over.items():
        out[k] = out[k] | v if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(d: dict) -> Recipe:
    """Rebuild a recipe saved in a checkpoint's config.json (checkpoint.py brings older ones up to date first)."""
    raw = {k: dict(v) for k, v in d.items() if k in SECTIONS}
    for k in DERIVED["model"]:
        raw["model"].pop(k, None)
    return build_recipe(raw, d.get("name", "checkpoint"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def list_methods() -> list[str]:
    return sorted(f"{p.stem}" for p in (RECIPE_DIR / "methods").glob("*.toml"))
