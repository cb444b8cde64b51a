"""The training loop: draw a dial and a source per sequence, train with the gates set at that dial.

A run directory holds `last/` and `best/` checkpoints, `metrics.jsonl` (one JSON object per log line),
and at the end `gates_loss_vs_dial.json` / `.png` (the network's own gates: mode gates)."""

import dataclasses
import fnmatch
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
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

from abcgpt.bank import CornerBank
from abcgpt.checkpoint import load_checkpoint, read_meta, restore_training_state, save_checkpoint
from abcgpt.common import (
    AbcgptError,
    CoreShare,
    Interrupted,
    atomic_write_text,
    check_writable,
    existing_dir,
    open_append,
    pick_device,
    refuse_link,
    run_lock,
    write_error,
)
from abcgpt.config import Recipe, TrainConfig
from abcgpt.data import Batcher, alone_steps, prepared_data
from abcgpt.dial import corner
from abcgpt.heldout import WIDE_TABLE, format_table, gates_loss_curve, loss_table, plot_gates_loss_curve
from abcgpt.memory import require_memory, training_parts
from abcgpt.model import build_model


def lr_at(step: int, t) -> float:
    """Linear warm-up, then cosine from lr down to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def optimizer_for(model, t: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """The recipe's AdamW for a model (a bank of corners: its sources' own units at train.own_decay_factor times
    the weight decay)."""
    own = {"own_decay_factor": t.own_decay_factor} if isinstance(model, CornerBank) else {}
    return model.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2), device_type, **own)


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
    if out.is_dir() and any(out.iterdir()) and not is_run(out):
        raise AbcgptError(f"{out} holds files that are not an abcgpt run: a run is written into a new or empty "
                          "folder, so choose another --out")
    pick_device(recipe.train.device)  # a device this machine lacks is refused before the run folder is made
    with run_lock(out) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return Trainer(recipe, out, resume, progress).train()


def is_run(folder: Path) -> bool:
    """A folder a trainer has started in: its lock, its recipe or a checkpoint are there."""
    return any((folder / name).exists() for name in (".lock", "recipe.json", "last", "last.old"))


class Trainer:
    """One run: its data, model, optimizer, batches and folder. `train` is the loop (nanoGPT's: lr, eval and
    checkpoint, forward/backward, clip, step, log); `train_step`, `evaluate` and `save` are its parts.
    `freeze(trainer)`, called once the model and optimizer are built (and restored), lets `abcgpt forget` /
    `add-source` (sources_edit.py) train part of a model: it sets requires_grad, hooks and the batches."""

    def __init__(self, recipe: Recipe, out: Path, resume: bool = False, progress: bool = True,
                 freeze: Callable[["Trainer"], None] | None = None):
        t = recipe.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.rank, self.world, self.device = setup_distributed(t.device)
        if t.batch_size % self.world:
            raise AbcgptError(f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes "
                              f"({self.world})")
        self.out, self.master = out, self.rank == 0
        self.progress = progress and self.master
        ckpt = load_checkpoint(existing_dir(out / "last"), self.device) if resume else None
        if ckpt is None and ((out / "last").exists() or (out / "last.old").exists()):
            raise AbcgptError(f"{out} already holds a run: resume it with `abcgpt train --resume {out}`, "
                              "or choose another --out")
        self.edits = ckpt.meta.edits if ckpt is not None else None  # carried into every checkpoint
        if self.edits and freeze is None:
            raise AbcgptError(f"{out} was made by `abcgpt forget` or `abcgpt add-source`, which train only part of the "
                              "model: rerun that command to resume it (nothing was changed)")
        if ckpt is not None and ckpt.meta.step > t.steps:
            raise AbcgptError(f"{out} is at step {ckpt.meta.step}: train.steps = {t.steps} would go back; give "
                              f"at least {ckpt.meta.step} (nothing was changed)")
        if self.master:  # one process prepares the data, the others wait for it
            self.data = prepared_data(recipe, self.progress)
        if self.world > 1:
            dist.barrier()
        if not self.master:
            self.data = prepared_data(recipe, False)
        # our own copy, completed with what the data decides: the caller's recipe is never changed
        model = dataclasses.replace(recipe.model, vocab_size=self.data.tokenizer.vocab_size,
                                    n_sources=len(self.data.sources))
        self.recipe = dataclasses.replace(recipe, model=model)
        self.t, self.cfg = t, model
        self.autocast = autocast_for(self.device, t.dtype)
        # a size that cannot fit is one line before anything is allocated, not the allocator's traceback
        parts = training_parts(model, t, self.device, self.world)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if self.device.type == "cpu" else 1  # ranks share RAM
        require_memory(sum(parts.values()) * local, "training", self.device,
                       "train.batch_size, model.n_embd, model.n_layer or model.block_size", parts)

        torch.manual_seed(t.seed)
        self.model = build_model(model).to(self.device)
        self.fsdp = t.fsdp and self.world > 1
        self.batcher = Batcher.from_recipe(self.recipe, self.data, self.device, self.rank, self.world)
        self.step, self.best, self.table = 0, math.inf, None
        if ckpt is not None:
            if ckpt.tokenizer.to_json() != self.data.tokenizer.to_json():
                raise AbcgptError(f"the prepared data in {self.data.dir} has another tokenizer than the run in {out}")
            self.model.load_state_dict(ckpt.model.state_dict())
        if self.fsdp:  # shard every block, then the rest (embeddings, final LayerNorm); parameters become DTensors
            for block in self.model.transformer.h:
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = optimizer_for(self.model, t, self.device.type)
        if ckpt is not None:
            state = (_restore_sharded(ckpt, self.model, self.optimizer) if self.fsdp
                     else restore_training_state(ckpt, self.optimizer))
            self.load_state_dict(state | {"step": ckpt.meta.step})
        if freeze is not None:
            freeze(self)
        # a bank's sources absent from a batch take no part in it
        self.ddp = (DDP(self.model, find_unused_parameters=not self.model.has_interior)
                    if self.world > 1 and not self.fsdp else None)
        self.step_model = self.ddp or self.model
        if t.compile:
            self.step_model = torch.compile(self.step_model)

    # the trainer's own state, beside the model's and the optimizer's: what a checkpoint stores and a resume reads
    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict(), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])
        self.best, self.step = state["best"], state["step"]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the last micro-batch's loss (not synced)."""
        t = self.t
        seeding = self.step < t.branch_step  # every sequence trains source 0's network (a bank's seed phase)
        if t.branch_step and self.step == t.branch_step:
            self.model.branch(self.optimizer)
        for micro in range(t.grad_accum):
            x, y, dials, sources = self.batcher.next()
            if seeding:
                dials = corner(0, dials.size(1)).to(dials).expand_as(dials)
            last = micro == t.grad_accum - 1  # DDP / FSDP: reduce the gradients once, on the last micro-step
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    _, loss = self.step_model(x, dials, y, sources)
                (loss / t.grad_accum).backward()
        if t.absent_sources == "step":  # plain AdamW semantics: every parameter steps, absent sources with grad 0
            for p in self.model.parameters():
                if p.grad is None and p.requires_grad:  # (a frozen parameter never steps)
                    p.grad = torch.zeros_like(p)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def evaluate(self) -> dict:
        """Held-out loss of every source at every corner and the middle (under FSDP every rank takes part)."""
        t, data = self.t, self.data
        table = loss_table(self.model, data, t.batch_size, t.eval_batches, self.autocast)
        _check_finite(sum(v for row in table.values() for v in row.values()), self.step, self.out, "held-out loss")
        self.table = table
        return table

    def save(self, name: str, metrics: dict) -> None:
        """A checkpoint in out/name (a collective under FSDP: every rank gathers, rank 0 writes)."""
        model, optimizer = self.model, self.optimizer
        if self.fsdp:
            model, optimizer = _gather_sharded(model, optimizer, self.cfg, self.t, self.master)
        if self.master:
            save_checkpoint(self.out / name, model, self.recipe, self.data.tokenizer, self.data.sources, self.step,
                            metrics, optimizer, self.state_dict(), self.edits)

    def train(self) -> dict:
        t, out, data = self.t, self.out, self.data
        if self.master:  # a fresh start drops what a run killed before its first checkpoint logged
            _truncate_log(out / "metrics.jsonl", self.step or -1)
            atomic_write_text(out / "recipe.json", json.dumps(self.recipe.to_dict(), indent=2))
        if self.step >= t.steps:
            print(f"{out} is already at step {self.step} of {t.steps}: nothing to do (raise it with --steps)")
        if self.progress:
            c = self.cfg
            print(f"training {self.recipe.name}: {self.model.num_params() / 1e6:.2f}M parameters, gates={c.gates}, "
                  f"method={c.method}, routing={c.routing}, sources {' / '.join(data.sources)}, device {self.device}")
        log = RunLog(out, self.recipe, t.log_to) if self.master else None
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        speed = Speedometer(self)
        # threads = 0: torch's threads follow the cores other processes leave idle (checked at each log line)
        cores = CoreShare() if not t.threads and self.device.type == "cpu" else None
        try:
            while self.step < t.steps:
                lr = lr_at(self.step, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.train_step()
                bar.update(1)
                step, last = self.step, self.step == t.steps
                if step % t.log_every == 0 or last:
                    lossf = _check_finite(loss, step, out)  # the one host sync per log interval
                    tok_s, mfu = speed.measure(step)
                    shown = {"loss": f"{lossf:.3f}", "tok_s": f"{tok_s:,.0f}"} | ({"mfu": f"{mfu:.1%}"} if mfu else {})
                    bar.set_postfix(shown)
                    _log(log, {"type": "train", "step": step, "loss": lossf, "lr": lr, "tok_per_s": tok_s, "mfu": mfu})
                    if cores is not None:
                        cores.fit()
                if not self.master and not self.fsdp:
                    continue  # evaluation and checkpoints are rank 0's; the others go on to the next all-reduce
                with speed.paused():  # tokens/s measures training alone
                    if step % t.eval_every == 0 or last:
                        table = self.evaluate()
                        trained = t.only_sources or data.sources
                        own = sum(table[s][s] for s in trained) / len(trained)
                        _log(log, {"type": "eval", "step": step, "heldout": table, "corner_own": own,
                                   "tokens_per_cell": t.batch_size * t.eval_batches * self.cfg.block_size})
                        if self.master:
                            bar.write(f"step {step}: held-out loss, each source at its own corner: " + (
                                ", ".join(f"{s} {table[s][s]:.3f}" for s in data.sources)
                                if len(data.sources) <= WIDE_TABLE else f"mean {own:.3f} over {len(trained)}"))
                        if own < self.best:
                            self.best = own
                            self.save("best", {"heldout": table, "corner_own": own})
                    if step % t.checkpoint_every == 0 or last:
                        _check_finite(loss, step, out)  # never overwrite a good checkpoint with a diverged model
                        self.save("last", {"heldout": self.table} if self.table else {})
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted at step {self.step}; resume from the last checkpoint with "
                              f"`abcgpt train --resume {out}`") from None
        finally:  # also on errors: the bar ends before the one-line message is printed
            bar.close()
            if log is not None:
                log.close()
        return self.finish()

    def finish(self) -> dict:
        """The loss table and the loss across the dial of the final model, written beside the checkpoints."""
        t, out, data, model = self.t, self.out, self.data, self.model
        if self.fsdp:  # the final numbers below need a whole model: rank 0 gathers one
            model, _ = _gather_sharded(model, self.optimizer, self.cfg, t, self.master)
        if self.world > 1:
            # free DDP (its reducer) while its process group lives: freed after it, when train() returned, rank 0
            # once hung in a futex at exit (seen once under load; py-spy put it at that return)
            self.ddp, self.step_model = None, self.model
            dist.barrier()  # the others wait for rank 0's last checkpoint
            dist.destroy_process_group()
            if not self.master:
                return {}
        table = self.table or loss_table(model, data, t.batch_size, t.eval_batches, self.autocast)
        # the loss across the dial: none for an ungated baseline (it has no dial), nor for a bank of corners (no
        # network between them: `abcgpt eval` mixes them)
        curve_png = None
        if model.has_interior and model.config.gates == "abc":
            curve = gates_loss_curve(model, data, t.batch_size, max(1, t.eval_batches // 2),
                                     autocast=self.autocast)
            atomic_write_text(out / "gates_loss_vs_dial.json", json.dumps(curve, indent=2))
            curve_png = out / "gates_loss_vs_dial.png"
            plot_gates_loss_curve(curve, curve_png,
                                  f"{self.recipe.name}, {self.step} steps: held-out loss across the dial through the "
                                  "network's own gates (mode gates)")
        if self.progress:
            cells = t.batch_size * t.eval_batches * self.cfg.block_size
            print(f"\nheld-out loss (nats/token) after {self.step} steps, {cells:,} tokens per cell "
                  f"(* = best position for that source):")
            print(format_table(table, data.sources))
            if "middle" in table and self.cfg.gates == "abc" and model.method.default_mode != "gates":
                print(f"(middle: the network's own gates, mode gates, which training never visits; the dial's "
                      f"default mode is {model.method.default_mode}: `abcgpt eval --ckpt {out}` scores it)")
            print(f"checkpoints in {out}/best and {out}/last"
                  + (f"; loss across the dial in mode gates: {curve_png}" if curve_png else ""))
        return table


class Speedometer:
    """Tokens/s and MFU of training alone: time spent evaluating and checkpointing is left out."""

    def __init__(self, trainer: Trainer):
        t, c = trainer.t, trainer.cfg
        self.tokens_per_step = t.batch_size * t.grad_accum * c.block_size
        self.peak = peak_flops(trainer.device, t.peak_tflops)
        self.world = trainer.world
        # PaLM, app. B; a token of a bank of corners runs one corner
        params = trainer.model.corner_params() if isinstance(trainer.model, CornerBank) else trainer.model.num_params()
        self.token_flops = 6 * params + 12 * c.n_layer * c.n_embd * c.block_size
        self.t0, self.step0, self.pause = time.time(), trainer.step, 0.0

    def measure(self, step: int) -> tuple[float, float | None]:
        now = time.time()
        tok_s = (step - self.step0) * self.tokens_per_step / max(now - self.t0 - self.pause, 1e-9)
        self.t0, self.step0, self.pause = now, step, 0.0
        # MFU: achieved FLOP/s over every process's accelerator, against the accelerator's peak
        return tok_s, tok_s * self.token_flops / (self.peak * self.world) if self.peak else None

    @contextmanager
    def paused(self):
        t0 = time.time()
        try:
            yield
        finally:
            self.pause += time.time() - t0


def _gather_sharded(model, optimizer, cfg, t, master: bool):
    """A whole model and optimizer on rank 0 from FSDP shards (a collective: every rank calls it)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, optimizer, options=full)
    if not master:
        return None, None
    whole = build_model(cfg)
    whole.load_state_dict(msd)
    whole_opt = optimizer_for(whole, t, "cpu")
    set_optimizer_state_dict(whole, whole_opt, osd)
    return whole, whole_opt


def _restore_sharded(ckpt, model, optimizer) -> dict:
    """Resume under FSDP: read the whole optimizer state as a plain run would, then shard it."""
    t = ckpt.recipe.train
    whole_opt = optimizer_for(ckpt.model, t, "cpu")
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
        self.file = open_append(out / "metrics.jsonl")
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
    refuse_link(path)
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


def train_baselines(recipe: Recipe, out: Path, progress: bool = True, only: list[str] | None = None) -> list[Path]:
    """The ungated comparison models of DESIGN §3, with the dial model's recipe and data: `joint` (every source) and
    `without_<s>` (every source but s) for the dial model's steps, and `alone_<s>` (s alone) for the steps the dial
    model spent on s, max(1, round(steps * w_s / sum(w))) with w the sources' weights: the same compute on s (its
    warm-up cut to its steps if longer). `only` keeps the runs whose names match one of its shell patterns (with
    100 sources, 100 `without_<s>` runs are rarely wanted). Runs that are complete are skipped, unfinished ones
    resumed."""
    names, t = [s.name for s in recipe.data.sources], recipe.train
    weights = [s.weight for s in recipe.data.sources]
    runs = ({"joint": ([], t.steps)} | {f"without_{s}": ([x for x in names if x != s], t.steps) for s in names}
            | {f"alone_{s}": ([s], alone_steps(t.steps, weights, i)) for i, s in enumerate(names)})
    if only:
        runs = {k: v for k, v in runs.items() if any(fnmatch.fnmatchcase(k, p) for p in only)}
        if not runs:
            raise AbcgptError(f"--only {','.join(only)} matches no baseline; the runs are joint, without_<source> "
                              "and alone_<source>")
    paths = []
    for run, (only, steps) in runs.items():
        alone = run.startswith("alone_")
        warmup = min(t.warmup_steps, steps) if alone else t.warmup_steps
        r = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, gates="none", routing="soft"),
                                train=dataclasses.replace(t, only_sources=only, steps=steps, warmup_steps=warmup,
                                                         branch_step=0))  # (no units to branch)
        path = Path(out) / run
        last = existing_dir(path / "last")
        done = read_meta(last).step if (last / "config.json").is_file() else None
        if progress:
            print(f"== baseline {run}: ungated, trained on {', '.join(only or names)} for {r.train.steps} steps"
                  + (" (the dial model's steps on it: equal compute)" if alone else ""))
        if done is None:
            train(r, path, progress=progress)
        elif done < r.train.steps:
            train(r, path, resume=True, progress=progress)
        elif progress:
            print(f"{path} is complete ({done} steps)")
        paths.append(path)
    return paths
