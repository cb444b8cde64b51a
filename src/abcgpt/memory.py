"""Memory estimates made before anything is allocated, so a model or batch that cannot fit is refused with one
line (the estimate, the machine's memory, what to reduce) instead of torch's allocator traceback.

    parts = training_parts(cfg, recipe.train, device)          # {"weights": bytes, "gradients": ..., ...}
    require_memory(sum(parts.values()), "training", device, "train.batch_size or model.n_embd", parts)

The estimates count what the code holds at its peak: for training the weights (fp32, and the bank's per-source
pieces), their gradients, AdamW's two moments and the activations autograd saves for the backward pass (per token
and layer 4 LayerNorm widths + 5 attention widths + 2 MLP widths: the LayerNorms' inputs and outputs, q/k/v, the
attention output and its contiguous copy, the MLP's pre- and post-GELU units), times a factor measured against the
peak RSS of real runs (benchmarks/memory_estimate.py), plus the logits and their copies. Attention goes through
F.scaled_dot_product_attention, whose flash kernels (CPU and CUDA) save no T x T matrix. They are meant to be
right within 2x: enough to tell a size that cannot fit from one that can."""

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path

import psutil
import torch

from abcgpt.bank import Piece, corner_config, shared_counts
from abcgpt.common import AbcgptError
from abcgpt.dial import MODE
from abcgpt.model import GPT, GPTConfig

# measured (benchmarks/memory_estimate.py): the process's peak RSS over the activations autograd saves, which
# leaves out the backward's transients (gradients of activations, the allocator's slack)
ACTIVATION_FACTOR = 1.3
LOGIT_COPIES = 4  # logits, log-softmax (saved by the loss), their gradients; the caller holds the logits too
# what a process takes on first running a model besides its tensors: on the CPU the kernels' code paged in, their
# lazy set-up and malloc's slack (measured: 15-30 MB for a model of a few kB); on CUDA cuBLAS's workspace, lazily
# loaded kernels and the caching allocator's rounding (not measured here: a margin)
RUNTIME_BYTES = {"cpu": 24 * 2**20, "cuda": 256 * 2**20}
SKIP_ENV = "ABCGPT_SKIP_MEMORY_CHECK"  # set (not 0): refuse nothing, the run tries (an estimate can be wrong)


def _shapes(config: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters of an ungated GPT of the config's size, built on the meta device: the
    model's own code sizes it, and nothing is allocated."""
    c = corner_config(config)
    return _shapes_of(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.bias)


@functools.lru_cache(maxsize=16)  # an engine asks at every generation; building even a meta model takes ~10 ms
def _shapes_of(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, bias: bool
               ) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, bias=bias, gates="none"))
    return [(n, tuple(p.shape)) for n, p in gpt.named_parameters()]


def param_counts(config: GPTConfig) -> tuple[int, int]:
    """(parameters of the whole model, parameters of the network one row runs at a corner). A gated GPT of width
    "total" has the ungated GPT's parameters (its specialties are a buffer); a bank of corners (bank.py) stores
    each weight's shared block once and its own pieces once per source."""
    shapes = _shapes(config)
    full = sum(math.prod(s) for _, s in shapes)
    if not _is_bank(config):
        return full, full
    counts = shared_counts(config)
    total = 0
    for name, shape in shapes:
        piece = Piece(name, shape, counts)
        shared = math.prod(piece.counts)
        total += shared + config.n_sources * (math.prod(shape) - shared)
    return total, full


def _is_bank(config: GPTConfig) -> bool:
    return config.width == "corner" and config.gates == "abc"


def _buffer_bytes(config: GPTConfig) -> int:
    """The gated GPT's specialties: one float32 row of n_sources per gated unit."""
    if config.gates != "abc" or _is_bank(config):
        return 0
    units = config.n_embd + config.n_layer * (config.n_head + 4 * config.n_embd)
    return 4 * units * config.n_sources


def corner_widths(config: GPTConfig) -> tuple[int, int, int, int]:
    """(residual channels, attention dims (heads x head size), MLP units, LayerNorm width) of the network one row
    runs: a corner of the partition method keeps its shared units and its 1/N of the rest of every group (the
    largest share, where N does not divide it), other networks all of them."""
    C, H, N = config.n_embd, config.n_head, config.n_sources
    if config.gates != "abc" or _is_bank(config) or config.method != "partition":
        return C, C, 4 * C, C

    shared = shared_counts(config)  # (the partition method shares as many units of a group as a bank's corner)

    def kept(size: int, shared: int) -> int:
        return (shared if config.shared_gate == "always" else 0) + math.ceil((size - shared) / N)

    # without gated LayerNorms a silenced channel's LayerNorm output is not 0: every residual channel stays
    c = kept(C, shared["res"]) if config.gate_norms else C
    h, u = kept(H, shared["head"] // (C // H)), kept(4 * C, shared["unit"])
    # norm = "full" pads a narrow LayerNorm back to n_embd channels (model.layer_norm); "active" stays narrow
    return c, h * (C // H), u, (c if config.norm == "active" or c == C else C)


def _act_floats(config: GPTConfig, widths: tuple[int, int, int, int], gated: bool) -> int:
    """Floats autograd saves per token of one row: per layer the LayerNorms' inputs and outputs, q/k/v, the
    attention output and its contiguous copy, the MLP units before and after GELU (plus the gates' products on a
    gated full-width row); the embeddings and the final LayerNorm once."""
    c, a, u, ln = widths
    layer = 4 * ln + 5 * a + 2 * u + (c if gated else 0)
    return config.n_layer * layer + 3 * ln


def _activation_bytes(dtype: str, device_type: str) -> float:
    """Bytes per activation. fp32: 4. Under bf16 autocast (train.autocast_for's rule) the tensors autograd saves
    take 0.56-0.6 of fp32's (measured: LayerNorms and the residual stream stay fp32), but the CPU's bf16 kernels
    make fp32 temporaries in the backward: a CPU run's peak RSS is 0.9 of the same run's in fp32 (measured)."""
    if dtype == "bfloat16" or (dtype == "auto" and device_type == "cuda"):
        return 2.4 if device_type == "cuda" else 3.6
    return 4.0


def training_parts(config: GPTConfig, train, device: torch.device | str = "cpu", world: int = 1
                   ) -> dict[str, int]:
    """Peak bytes of one training process, by part: config is the model table with the data's vocab_size and
    n_sources filled in, train the recipe's TrainConfig (batch_size, dtype, corner_fraction, ...), world the
    number of processes (each trains batch_size / world rows; FSDP shards the weights and their state).
    grad_accum does not add: each micro-batch's activations are freed by its backward."""
    device_type = torch.device(device).type
    B = max(1, train.batch_size // world)
    T, V, N = config.block_size, config.vocab_size, config.n_sources
    total, corner = param_counts(config)
    shard = world if train.fsdp and world > 1 else 1
    bank = _is_bank(config)
    # sources whose gradients one step holds: the bank's absent sources keep .grad None ("skip")
    present = min(N, B * train.grad_accum, train.sources_per_batch * train.grad_accum or N)
    if bank and train.absent_sources == "skip":
        own = (total - corner) / (N - 1) if N > 1 else 0  # one source's own pieces
        grads = total - (N - present) * own
    else:
        grads = total
    ddp = total if world > 1 and not train.fsdp else 0  # DDP's gradient buckets: a second copy
    ab = _activation_bytes(train.dtype, device_type)

    # rows that run at their corner's own width (model._width_groups) and rows at full width with gates
    narrow_ok = config.gates == "abc" and config.method == "partition" and (bank or config.gate_norms)
    cf = train.corner_fraction if narrow_ok else 0.0
    if cf >= 1.0:
        full_rows = 0
    elif train.dial_sampling == "per_batch" or cf <= 0.0:
        full_rows = B  # a whole batch off the corners
    else:  # a batch with more interior rows than usual: two standard deviations above the mean
        full_rows = min(B, math.ceil(B * (1 - cf) + 2 * math.sqrt(B * cf * (1 - cf))))
    narrow_rows = B - full_rows
    floats = (full_rows * _act_floats(config, (config.n_embd, config.n_embd, 4 * config.n_embd, config.n_embd),
                                      config.gates == "abc")
              + narrow_rows * _act_floats(config, corner_widths(config), False))
    activations = ACTIVATION_FACTOR * floats * T * ab
    # a corner row runs a network built from the weights (bank: joined; gated: narrowed, gates folded in), one per
    # corner present, each saved for the backward and then given a gradient
    groups = min(N, B, train.sources_per_batch or N, narrow_rows)
    if groups and bank:
        activations += 2 * 4 * groups * corner
    elif groups:
        c, a, u, _ = corner_widths(config)
        sub = (V + T) * c + config.n_layer * (4 * a * c + 2 * u * c)
        activations += 2 * 4 * groups * sub
    if ab < 4:  # autocast keeps a bf16 copy of each weight it casts
        activations += 2 * (corner if bank else total)
    if config.dropout > 0:
        # a dropout mask (1 byte) per element after each of a layer's two output projections
        activations += B * T * config.n_layer * 2 * config.n_embd
        if device_type != "cuda":
            # with dropout the CPU's scaled_dot_product_attention is the plain one: it saves the T x T attention
            # weights of every head (probabilities, mask, dropped)
            heads = corner_widths(config)[1] // (config.n_embd // config.n_head)
            activations += 3 * ab * config.n_layer * T * T * (full_rows * config.n_head + narrow_rows * heads)
    logits = LOGIT_COPIES * B * T * V * 4  # the loss's log-softmax and gradients are fp32 under autocast too
    return {"weights": int(4 * total / shard + _buffer_bytes(config)), "gradients": int(4 * grads / shard + 4 * ddp),
            "AdamW": int(8 * total / shard), "activations": int(activations), "logits": int(logits),
            "runtime": _runtime(device_type)}


def _runtime(device_type: str) -> int:
    return RUNTIME_BYTES.get(device_type, RUNTIME_BYTES["cpu"])


def training_bytes(config: GPTConfig, train, device: torch.device | str = "cpu", world: int = 1) -> int:
    """Peak bytes of one training process (training_parts, summed)."""
    return sum(training_parts(config, train, device, world).values())


def generation_parts(config: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int,
                     dials: torch.Tensor | None = None, mode: str = "gates", weights: bool = False,
                     device: torch.device | str = "cpu") -> dict[str, int]:
    """Bytes the engine adds to generate max_new_tokens after prompts of prompt_len tokens for `rows` rows at
    dials (rows, N) in a dial mode (dials None: an ungated model), by part; weights=True counts the model's own
    weights too (before a checkpoint is loaded). Corners run their sub-networks (copies of their weights, at their
    own width); switch, tokens and product run every active corner on every row; every row's network keeps a KV
    cache of block_size positions (KVCache preallocates it) in each layer."""
    T, V, L = config.block_size, config.vocab_size, config.n_layer
    total, corner = param_counts(config)
    full = (config.n_embd, config.n_embd, 4 * config.n_embd, config.n_embd)
    rows_run, networks, widths, score = rows, 0, full, False
    if dials is not None and config.gates == "abc":
        active = int((dials > 0).any(dim=0).sum())
        at_corners = bool(((dials > 0).sum(dim=1) == 1).all())
        if at_corners or not MODE[mode].folds_gates:  # every row runs one corner, or every active corner
            widths = corner_widths(config)
            networks, rows_run = ((int(torch.unique(dials, dim=0).size(0)), rows) if at_corners
                                  else MODE[mode].runs(rows, active))
            score = not at_corners and MODE[mode].posterior  # the prompt scored at every corner
        else:  # gates mode between corners: each distinct dial's network at full width
            networks = int(torch.unique(dials, dim=0).size(0))
    c, a, u, ln = widths
    sub = corner if _is_bank(config) else (V + T) * c + L * (4 * a * c + 2 * u * c)
    # past block_size the cache is rebuilt from the last 3/4 of the context: a forward as long as a prompt
    prefill = max(prompt_len, 3 * T // 4 if prompt_len + max_new_tokens > T else 0)
    parts = {
        "weights": 4 * total + _buffer_bytes(config) if weights else 0,
        "sub-networks": 4 * networks * sub,
        "KV cache": 4 * rows_run * T * L * 2 * a,
        # the prompt's forward (no autograd: one layer's tensors at a time), or its logits at every corner
        "prompt": 4 * rows_run * prefill * (3 * a + 2 * u + 2 * ln)
                  + (4 * 2 * rows * prompt_len * V if score else 0),
        # a step's logits: the model's, float, tempered, top-k masked, softmax
        "logits": 4 * 5 * rows_run * V,
        "tokens": 8 * 3 * rows * (prompt_len + max_new_tokens),
        "runtime": _runtime(torch.device(device).type),
    }
    return {k: int(v) for k, v in parts.items()}


def generation_bytes(config: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int,
                     dials: torch.Tensor | None = None, mode: str = "gates", weights: bool = False,
                     device: torch.device | str = "cpu") -> int:
    """Bytes the engine adds to generate (generation_parts, summed)."""
    return sum(generation_parts(config, rows, prompt_len, max_new_tokens, dials, mode, weights, device).values())


def _cgroup_free() -> int | None:
    """Bytes the container's memory limit leaves (cgroup v2, else v1), None without a limit: psutil sees the
    host's memory, the kernel kills at the container's limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:
            return max(0, int(cap) - used)
    return None


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """(bytes free now, bytes in all) of a device, None when unknown: a CUDA GPU's (its driver's count, other
    processes included), else this machine's RAM (MPS shares it): available (free plus reclaimable cache), within
    a container's limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    ram = _ram()
    limited = _cgroup_free()
    if limited is None:
        return ram
    return min(ram[0], limited), ram[1]


def _ram() -> tuple[int, int]:
    """(available, total) RAM: available counts free memory and the cache the kernel can reclaim."""
    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def fmt_bytes(n: float) -> str:
    """1.5 GB, 320 MB, 12 kB: three significant digits at most."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def require_memory(nbytes: int, what: str, device: torch.device | str,
                   reduce: str = "the batch size or the model's size",
                   parts: Mapping[str, int] | None = None) -> None:
    """An AbcgptError (one line: the estimate, its largest parts, the device's memory, what to reduce) when
    `what` is estimated to need more than the device has free; nothing is allocated to find out.
    ABCGPT_SKIP_MEMORY_CHECK=1 lets the run try anyway."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    device = torch.device(device)
    known = device_memory(device)
    if known is None or nbytes <= known[0]:
        return
    free, total = known
    where = "this machine" if device.type in ("cpu", "mps") else f"{device} ({torch.cuda.get_device_name(device)})"
    shown = ""
    if parts:
        big = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:4]
        shown = " (" + ", ".join(f"{k} {fmt_bytes(v)}" for v, k in big) + ")"
    raise AbcgptError(f"{what} needs about {fmt_bytes(nbytes)}{shown} but {where} has {fmt_bytes(free)} free of "
                      f"{fmt_bytes(total)}: reduce {reduce} (or set {SKIP_ENV}=1 to try anyway)")
