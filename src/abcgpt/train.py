"""The training loop: draw a dial and a source per sequence, train with the gates set at that dial.

A run directory holds `last/` and `best/` checkpoints, `metrics.jsonl` (one JSON object per log line),
and at the end `loss_vs_dial.json` / `.png`."""

import copy
import json
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from abcgpt.checkpoint import load_checkpoint, read_meta, restore_training_state, save_checkpoint
from abcgpt.common import (
    AbcgptError,
    Interrupted,
    atomic_write_text,
    check_writable,
    existing_dir,
    pick_device,
    run_lock,
    write_error,
)
from abcgpt.config import Recipe
from abcgpt.data import Batcher, prepared_data
from abcgpt.evaluate import format_table, loss_curve, loss_table, plot_loss_curve
from abcgpt.model import GPT


def lr_at(step: int, t) -> float:
    """Linear warm-up, then cosine from lr down to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the device name
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
               "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    """The accelerator's peak FLOP/s for MFU: train.peak_tflops if set, else looked up by GPU name."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK set) this joins the process group: NCCL with one GPU
    per process, else gloo on the CPU. A plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def train(recipe: Recipe, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run in `out`; returns the final held-out loss table.

    Under torchrun every process draws the same global batch and trains on its slice of it (DDP averages
    the gradients), so a run follows the same trajectory on any number of processes. The run folder is locked
    while rank 0 trains in it: a second trainer there is refused."""
    out = check_writable(Path(out))
    pick_device(recipe.train.device)  # a device this machine lacks is refused before the run folder is made
    if int(os.environ.get("RANK", 0)) != 0:
        return _train(recipe, out, resume, progress)
    with run_lock(out):
        return _train(recipe, out, resume, progress)


def _train(recipe: Recipe, out: Path, resume: bool, progress: bool) -> dict:
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    rank, world, device = setup_distributed(t.device)
    if t.batch_size % world:
        raise AbcgptError(f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes ({world})")
    master = rank == 0
    ckpt = load_checkpoint(existing_dir(out / "last"), device) if resume else None
    if ckpt is None and ((out / "last").exists() or (out / "last.old").exists()):
        raise AbcgptError(f"{out} already holds a run: resume it with `abcgpt train --resume {out}`, "
                          "or choose another --out")
    if ckpt is not None and ckpt.meta["step"] > t.steps:
        raise AbcgptError(f"{out} is at step {ckpt.meta['step']}: train.steps = {t.steps} would go back; give at "
                          f"least {ckpt.meta['step']} (nothing was changed)")
    progress = progress and master
    autocast = autocast_for(device, t.dtype)
    if master:  # one process prepares the data, the others wait for it
        data = prepared_data(recipe, progress)
    if world > 1:
        dist.barrier()
    if not master:
        data = prepared_data(recipe, False)
    cfg = recipe.model
    cfg.vocab_size, cfg.n_sources = data.tokenizer.vocab_size, len(data.sources)

    torch.manual_seed(t.seed)
    model = GPT(cfg).to(device)
    fsdp = t.fsdp and world > 1
    only = None if cfg.gates == "abc" else [data.sources.index(s) for s in t.only_sources or data.sources]
    batcher = Batcher(data, cfg.block_size, t.batch_size, device, t.seed, t.dial_concentration,
                      t.dial_sampling == "per_batch", only, [s.weight for s in recipe.data.sources], rank, world,
                      t.corner_fraction)
    step, best = 0, math.inf
    if ckpt is not None:
        if ckpt.tokenizer.to_json() != data.tokenizer.to_json():
            raise AbcgptError(f"the prepared data in {data.dir} has another tokenizer than the run in {out}")
        model.load_state_dict(ckpt.model.state_dict())
    if fsdp:  # shard every block, then the rest (embeddings, final LayerNorm); parameters become DTensors
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = model.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), device.type)
    if ckpt is not None:
        trainer = restore_training_state(ckpt, optimizer) if not fsdp else _restore_sharded(ckpt, model, optimizer)
        batcher.load_state(trainer["batcher"])
        step, best = ckpt.meta["step"], trainer["best"]
        if master:
            _truncate_log(out / "metrics.jsonl", step)
        if step >= t.steps:
            print(f"{out} is already at step {step} of {t.steps}: nothing to do (raise it with --steps)")
    if master:
        atomic_write_text(out / "recipe.json", json.dumps(recipe.to_dict(), indent=2))
    ddp = DDP(model) if world > 1 and not fsdp else None
    step_model = torch.compile(ddp or model) if t.compile else (ddp or model)

    if progress:
        print(f"training {recipe.name}: {model.num_params() / 1e6:.2f}M parameters, gates={cfg.gates}, "
              f"method={cfg.method}, routing={cfg.routing}, sources {' / '.join(data.sources)}, device {device}")
    log = RunLog(out, recipe, t.log_to) if master else None
    bar = tqdm(total=t.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.block_size
    peak = peak_flops(device, t.peak_tflops)
    token_flops = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size  # PaLM, appendix B
    t_log, step_at_log = time.time(), step
    table = None

    def save(path: Path, metrics: dict) -> None:
        whole, whole_opt = (model, optimizer) if not fsdp else _gather_sharded(model, optimizer, cfg, t, master)
        if master:
            save_checkpoint(path, whole, recipe, data.tokenizer, data.sources, step, metrics, whole_opt,
                            {"batcher": batcher.state(), "best": best})

    try:
        while step < t.steps:
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(t.grad_accum):
                x, y, dials, sources = batcher.next()
                # DDP / FSDP: reduce the gradients once, on the last micro-step
                sync = ddp.no_sync() if ddp is not None and micro < t.grad_accum - 1 else nullcontext()
                if fsdp:
                    model.set_requires_gradient_sync(micro == t.grad_accum - 1)
                with sync:
                    with autocast():
                        _, loss = step_model(x, dials, y, sources)
                    (loss / t.grad_accum).backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % t.log_every == 0 or step == t.steps:
                lossf = _check_finite(loss, step, out)  # the one host sync per log interval
                now = time.time()
                tok_s = (step - step_at_log) * tokens_per_step / (now - t_log)
                t_log, step_at_log = now, step
                # MFU: achieved FLOP/s over every process's accelerator, against the accelerator's peak
                mfu = tok_s * token_flops / (peak * world) if peak else None
                bar.set_postfix(loss=f"{lossf:.3f}", tok_s=f"{tok_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
                _log(log, {"type": "train", "step": step, "loss": lossf, "lr": lr, "tok_per_s": tok_s, "mfu": mfu})

            if not master and not fsdp:
                continue  # evaluation and checkpoints are rank 0's; the others go on to the next all-reduce
            if step % t.eval_every == 0 or step == t.steps:  # (sharded: every rank takes part in the forward)
                table = loss_table(model, data, t.batch_size, t.eval_batches, autocast)
                trained = t.only_sources or data.sources
                own = sum(table[s][s] for s in trained) / len(trained)
                _check_finite(sum(v for row in table.values() for v in row.values()), step, out, "held-out loss")
                _log(log, {"type": "eval", "step": step, "heldout": table, "corner_own": own,
                           "tokens_per_cell": t.batch_size * t.eval_batches * cfg.block_size})
                if master:
                    bar.write(f"step {step}: held-out loss, each source at its own corner: "
                              + ", ".join(f"{s} {table[s][s]:.3f}" for s in data.sources))
                if own < best:
                    best = own
                    save(out / "best", {"heldout": table, "corner_own": own})
                t_log = time.time()  # tokens/s measures training alone
            if step % t.checkpoint_every == 0 or step == t.steps:
                _check_finite(loss, step, out)  # never overwrite a good checkpoint with a diverged model
                save(out / "last", {"heldout": table} if table else {})
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {step}; resume from the last checkpoint with "
                          f"`abcgpt train --resume {out}`") from None
    finally:  # also on errors: the bar ends before the one-line message is printed
        bar.close()
        if log is not None:
            log.close()
    if fsdp:  # the final numbers below need a whole model: rank 0 gathers one
        model, _ = _gather_sharded(model, optimizer, cfg, t, master)
    if world > 1:
        dist.barrier()  # the others wait for rank 0's last checkpoint
        dist.destroy_process_group()
        if not master:
            return {}

    if table is None:  # a resumed run that had nothing left to do
        table = loss_table(model, data, t.batch_size, t.eval_batches, autocast)
    curve = loss_curve(model, data, t.batch_size, max(1, t.eval_batches // 2), autocast=autocast)
    atomic_write_text(out / "loss_vs_dial.json", json.dumps(curve, indent=2))
    plot_loss_curve(curve, out / "loss_vs_dial.png", f"{recipe.name}: held-out loss across the dial, "
                                                      f"{step} steps")
    if progress:
        cells = t.batch_size * t.eval_batches * cfg.block_size
        print(f"\nheld-out loss (nats/token) after {step} steps, {cells:,} tokens per cell "
              f"(* = best position for that source):")
        print(format_table(table, data.sources))
        print(f"checkpoints in {out}/best and {out}/last; loss across the dial: {out}/loss_vs_dial.png")
    return table


def _gather_sharded(model, optimizer, cfg, t, master: bool):
    """A whole model and optimizer on rank 0 from FSDP shards (a collective: every rank calls it)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, optimizer, options=full)
    if not master:
        return None, None
    whole = GPT(cfg)
    whole.load_state_dict(msd)
    whole_opt = whole.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), "cpu")
    set_optimizer_state_dict(whole, whole_opt, osd)
    return whole, whole_opt


def _restore_sharded(ckpt, model, optimizer) -> dict:
    """Resume under FSDP: read the whole optimizer state as a plain run would, then shard it."""
    t = ckpt.recipe.train
    whole_opt = ckpt.model.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), "cpu")
    trainer = restore_training_state(ckpt, whole_opt)
    osd = get_optimizer_state_dict(ckpt.model, whole_opt)
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    return trainer


def _check_finite(loss: torch.Tensor | float, step: int, out: Path, what: str = "loss") -> float:
    lossf = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(lossf):
        raise AbcgptError(f"{what} became {lossf} at step {step}; training stopped, the last good checkpoint is "
                          f"{out / 'last'} (try a lower train.lr)")
    return lossf


class RunLog:
    """metrics.jsonl, and TensorBoard / Weights & Biases when train.log_to names them (rank 0 only)."""

    def __init__(self, out: Path, recipe: Recipe, sinks: list[str]):
        self.file = open(out / "metrics.jsonl", "a")
        self.tb = self.wandb = None
        try:
            if "tensorboard" in sinks:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            if "wandb" in sinks:
                import wandb

                # offline unless WANDB_MODE says otherwise: a run never needs the network
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "abcgpt"), name=out.name,
                                        dir=str(out), config=recipe.to_dict(),
                                        mode=os.environ.get("WANDB_MODE", "offline"))
        except ImportError as e:
            raise AbcgptError(f"train.log_to needs {e.name}: pip install 'abcgpt[log]'") from None

    def __call__(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: say which file
            raise write_error(Path(self.file.name), e) from None
        scalars = {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "tok_per_s", "mfu") and v}
        for dial, row in record.get("heldout", {}).items():
            scalars |= {f"heldout/{s} at {dial}": v for s, v in row.items()}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _log(log: RunLog | None, record: dict) -> None:
    if log is not None:
        log(record)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the kill
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def train_baselines(recipe: Recipe, out: Path, progress: bool = True) -> list[Path]:
    """The ungated comparison models of DESIGN §3, with the dial model's recipe, steps and data: `joint` (every
    source) and `without_<s>` for each source s. Runs that are complete are skipped, unfinished ones resumed."""
    names = [s.name for s in recipe.data.sources]
    runs = {"joint": []} | {f"without_{s}": [x for x in names if x != s] for s in names}
    paths = []
    for run, only in runs.items():
        r = copy.deepcopy(recipe)
        r.model.gates, r.model.routing, r.train.only_sources = "none", "soft", only
        path = Path(out) / run
        last = existing_dir(path / "last")
        done = read_meta(last)["step"] if (last / "config.json").is_file() else None
        if progress:
            print(f"== baseline {run}: ungated, trained on {', '.join(only or names)}")
        if done is None:
            train(r, path, progress=progress)
        elif done < r.train.steps:
            train(r, path, resume=True, progress=progress)
        elif progress:
            print(f"{path} is complete ({done} steps)")
        paths.append(path)
    return paths
