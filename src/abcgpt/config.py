"""Recipes: TOML files with [data], [model] and [train] tables; any key overridable with --set key=value.

A recipe is a name (a file in abcgpt/configs/) or a path. Unknown keys and wrong types are errors."""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from abcgpt.common import AbcgptError
from abcgpt.model import GPTConfig
from abcgpt.sources import SourceSpec

RECIPE_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    dir: str = "data/{recipe}"  # where prepared shards go; {recipe} is the recipe's name
    tokenizer: str = "char"  # "char" | "bpe"
    vocab_size: int = 4096  # BPE only
    heldout_fraction: float = 0.1  # held out from the end of a source that has no validation file
    sources: list[SourceSpec] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dial_sampling: str = "per_sequence"  # "per_sequence" | "per_batch" (the reference: one dial per step)
    dial_concentration: float = 0.5  # dial ~ Beta(c, c) / Dirichlet(c)
    corner_fraction: float = 1.0  # share of draws put at an exact corner (one source alone); 1 = always
    only_sources: list = field(default_factory=list)  # ungated baselines: train on these sources only ([] = all)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, else fp32) | "float32" | "bfloat16"
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2), not DDP
    peak_tflops: float = 0.0  # the accelerator's dense bf16 peak for MFU; 0 looks it up by GPU name
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    eval_every: int = 250
    eval_batches: int = 8  # held-out batches per source per dial position
    log_every: int = 10
    log_to: list = field(default_factory=list)  # besides metrics.jsonl: "tensorboard", "wandb" (offline by default)
    checkpoint_every: int = 250


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
CHOICES = {
    ("data", "tokenizer"): ("char", "bpe"),
    ("model", "gates"): ("abc", "none"),
    ("model", "method"): ("partition", "reference"),
    ("model", "gate_shape"): ("cos2", "linear"),
    ("model", "shared_gate"): ("always", "middle"),
    ("model", "routing"): ("soft", "routed"),
    ("train", "dial_sampling"): ("per_sequence", "per_batch"),
    ("train", "dtype"): ("auto", "float32", "bfloat16"),
}


# model.method = "reference" is the original method of DESIGN §1: these are its values of the knobs the two
# methods do not share (a recipe's own value of a key, or --set, still wins). The other method, "partition",
# takes the defaults of the dataclasses above.
REFERENCE_METHOD = {"model": {"routing": "soft", "narrowness": 1.0, "gate_shape": "cos2", "gate_norms": False},
                    "train": {"dial_sampling": "per_batch", "dial_concentration": 0.5, "corner_fraction": 0.0}}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section]) if f.name not in DERIVED.get(section, ())}


def _check_type(where: str, value, default):
    """Values must have the type of the field's default (an int is accepted where a float is expected)."""
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not type(value):
        raise AbcgptError(f"{where} must be {want.__name__}, got {value!r}")
    return value


def build_recipe(raw: dict, name: str) -> Recipe:
    """Validate a parsed TOML dict and fill in defaults."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise AbcgptError(f"unknown table [{sorted(unknown)[0]}] in recipe {name}; allowed: data, model, train")
    sections = {}
    for section in SECTIONS:
        if not isinstance(raw.get(section, {}), dict):
            raise AbcgptError(f"[{section}] in recipe {name} must be a table, got {raw[section]!r}")
    reference = raw.get("model", {}).get("method") == "reference"
    for section, cls in SECTIONS.items():
        table = (REFERENCE_METHOD.get(section, {}) if reference else {}) | dict(raw.get(section, {}))
        fields = _fields(section)
        kwargs = {}
        for key, value in table.items():
            if key not in fields:
                raise AbcgptError(f"unknown key {section}.{key} in recipe {name}; allowed: "
                                  f"{', '.join(f'{section}.{k}' for k in fields)}")
            if section == "data" and key == "sources":
                if not isinstance(value, list):
                    raise AbcgptError("data.sources must be a list of tables ([[data.sources]])")
                kwargs[key] = [SourceSpec.from_dict(s if isinstance(s, dict) else {"name": s}) for s in value]
                continue
            value = _check_type(f"{section}.{key}", value, getattr(cls(), key))
            choices = CHOICES.get((section, key))
            if choices and value not in choices:
                raise AbcgptError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
            kwargs[key] = value
        sections[section] = cls(**kwargs)
    recipe = Recipe(name=name, **sections)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
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
    for sink in t.log_to:
        if sink not in ("tensorboard", "wandb"):
            raise AbcgptError(f"train.log_to may name tensorboard and wandb, got {sink!r}")
    if t.only_sources and m.gates != "none":
        raise AbcgptError('train.only_sources is for ungated baselines: set model.gates = "none" too')
    positive = {"model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
                "model.block_size": m.block_size, "model.narrowness": m.narrowness, "train.steps": t.steps,
                "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.lr": t.lr,
                "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                "train.log_every": t.log_every, "train.checkpoint_every": t.checkpoint_every,
                "train.dial_concentration": t.dial_concentration}
    for key, v in positive.items():
        if not v > 0:
            raise AbcgptError(f"{key} must be > 0, got {v}")
    if m.specialty_concentration < 0:
        raise AbcgptError(f"model.specialty_concentration must be > 0, or 0 for 1/N; got {m.specialty_concentration}")
    if not 0.0 <= m.shared_fraction < 1.0:
        raise AbcgptError(f"model.shared_fraction must be in [0, 1), got {m.shared_fraction}")
    if not 0.0 <= t.corner_fraction <= 1.0:
        raise AbcgptError(f"train.corner_fraction must be in [0, 1], got {t.corner_fraction}")
    if m.n_embd % m.n_head:
        raise AbcgptError(f"model.n_embd ({m.n_embd}) must be a multiple of model.n_head ({m.n_head})")
    if not 0.0 <= m.dropout < 1.0:
        raise AbcgptError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 <= t.min_lr <= t.lr:
        raise AbcgptError(f"train.min_lr must be in [0, train.lr], got {t.min_lr}")
    if not 0.0 < r.data.heldout_fraction <= 0.5:
        raise AbcgptError(f"data.heldout_fraction must be in (0, 0.5], got {r.data.heldout_fraction}")


def parse_override(item: str) -> tuple[str, str, object]:
    """'train.lr=3e-4' (or 'lr=3e-4' when the key names one field) -> (section, key, value as TOML reads it)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise AbcgptError(f"--set takes key=value, got {item!r}")
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in _fields(section):
            raise AbcgptError(f"unknown config key {key!r}; see `abcgpt config --config NAME` for the keys")
    else:
        owners = [s for s in SECTIONS if key in _fields(s)]
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


def load_recipe(config: str, overrides: list[str] = ()) -> Recipe:
    """A recipe by name (abcgpt/configs/NAME.toml) or path, with --set overrides applied."""
    path = Path(config)
    if not path.suffix:
        path = RECIPE_DIR / f"{config}.toml"
        if not path.exists():
            raise AbcgptError(f"unknown recipe {config!r}; built-in recipes: {', '.join(list_recipes())}, "
                              "or give a path to a .toml file")
    if not path.is_file():
        raise AbcgptError(f"recipe file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AbcgptError(f"recipe {path} is not valid TOML: {e}") from None
    for item in overrides:
        section, name, value = parse_override(item)
        raw.setdefault(section, {})[name] = value
    return build_recipe(raw, path.stem)


def recipe_from_dict(d: dict) -> Recipe:
    """Rebuild a recipe saved in a checkpoint's config.json."""
    raw = {k: dict(v) for k, v in d.items() if k in SECTIONS}
    raw["model"].setdefault("method", "reference")  # saved before there was a choice: the original method
    for k in DERIVED["model"]:
        raw["model"].pop(k, None)
    return build_recipe(raw, d.get("name", "checkpoint"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
