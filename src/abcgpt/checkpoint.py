"""Checkpoints: one directory, written atomically, nothing in it ever unpickled.

    model.safetensors      weights and the frozen specialties
    config.json            recipe, model config, source names and order, tokenizer, step, metrics, file hashes
    tokenizer.json         the tokenizer the model was trained with
    optimizer.safetensors  AdamW moments and the RNG states (training checkpoints only, for exact resume)
"""

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from abcgpt.common import AbcgptError, existing_dir, fsync_dir, replace_dir
from abcgpt.config import Recipe, recipe_from_dict
from abcgpt.model import GPT, GPTConfig
from abcgpt.tokenizer import Tokenizer, load_tokenizer

FORMAT = "abcgpt-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    recipe: Recipe
    tokenizer: Tokenizer
    meta: dict  # the whole config.json

    @property
    def sources(self) -> list[str]:
        return self.meta["sources"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, model: GPT, recipe: Recipe, tokenizer: Tokenizer, sources: list[str],
                    step: int, metrics: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    trainer: dict | None = None) -> None:
    """Write into path.tmp, fsync, then swap it in: a crash at any moment leaves a complete checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
        "recipe": recipe.to_dict(),
        "model": dataclasses.asdict(model.config),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "file": "tokenizer.json"},
        "num_params": model.num_params(),
        "metrics": metrics or {},
        "trainer": trainer,
        "files": {f.name: sha256(f) for f in sorted(tmp.iterdir())},
    }
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    fsync_dir(tmp)
    replace_dir(tmp, path)


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
    """Load optimizer moments and RNG states into place; returns the trainer metadata."""
    trainer = ckpt.meta.get("trainer") or {}
    f = ckpt.path / "optimizer.safetensors"
    if "optimizer" not in trainer or not f.is_file():
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
        for key, v in trainer["optimizer"]["scalars"].items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        groups = trainer["optimizer"]["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise AbcgptError(f"{f} does not hold a usable optimizer state ({type(e).__name__}: {e}): cannot resume "
                          "from it") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return trainer


def _load_tensors(f: Path) -> dict:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise AbcgptError(f"{f} is corrupted: {e}") from None


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run directory: its best checkpoint, else its last."""
    path = existing_dir(Path(path))
    if not path.exists():
        raise AbcgptError(f"checkpoint {path} does not exist")
    for candidate in (path, path / "best", path / "last"):
        candidate = existing_dir(candidate)
        if (candidate / "config.json").is_file():
            return candidate
    raise AbcgptError(f"{path} is not an abcgpt checkpoint or run directory (no config.json in it, "
                      "nor in best/ or last/)")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = resolve(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AbcgptError(f"{path}/config.json is corrupted: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AbcgptError(f"{path} is not an abcgpt checkpoint (config.json has no format: {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise AbcgptError(f"{path} is checkpoint version {meta.get('version')}; this abcgpt reads {VERSION}")
    files, step = meta.get("files"), meta.get("step")
    if not isinstance(files, dict) or "model.safetensors" not in files or not isinstance(step, int):
        raise AbcgptError(f"{path}/config.json is corrupted: it must list the hashes of the checkpoint's files "
                          "and an integer step")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise AbcgptError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256(f) != digest:
            raise AbcgptError(f"checkpoint {path} is corrupted: {name} does not match its recorded sha256")
    try:
        recipe = recipe_from_dict(meta["recipe"])
        # keys a checkpoint from an older abcgpt lacks come from its recipe, which knows their old values
        model = GPT(GPTConfig(**(dataclasses.asdict(recipe.model) | meta["model"])))
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    except AbcgptError as e:
        raise AbcgptError(f"checkpoint {path} cannot be loaded: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, SafetensorError, RuntimeError) as e:
        raise AbcgptError(f"checkpoint {path} cannot be loaded ({type(e).__name__}): {e}") from None
    model.to(device)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise AbcgptError(f"checkpoint {path} is inconsistent: its tokenizer has {tokenizer.vocab_size} tokens, "
                          f"its model {model.config.vocab_size}")
    return Checkpoint(path, model, recipe, tokenizer, meta)
