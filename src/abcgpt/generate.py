"""Sampling: incremental decoding with a KV cache, one dial per sequence, text streamed as it comes."""

from collections.abc import Iterator

import torch

from abcgpt.model import GPT, KVCache
from abcgpt.tokenizer import Tokenizer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. A temperature below 1e-4 means greedy (dividing by less overflows)."""
    if temperature < 1e-4:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_tokens(model: GPT, prompt: torch.Tensor, dial: torch.Tensor | None, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield (B,) next tokens, max_new_tokens times. prompt (B, T0) ids; dial (B, N) or (N,).

    With the cache, each step feeds one token. When the context reaches block_size, the cache is rebuilt
    from the last 3/4 of the context (learned positions cannot slide), so long generations stay cheap.
    Without it, every step re-runs the whole (cropped) context, as nanoGPT does."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    block = model.config.block_size
    idx = prompt.to(device)
    if dial is not None:
        dial = dial.to(device)
    dtype = next(model.parameters()).dtype
    cache, feed = None, idx
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block:], dial)
        else:
            if cache is None or cache.pos + feed.size(1) > block:
                feed = idx[:, -(3 * block // 4):] if cache is not None else idx[:, -block:]
                cache = KVCache(model.config, idx.size(0), block, device, dtype)
            logits, _ = model(feed, dial, cache=cache)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, gen)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        feed = nxt[:, None]
        yield nxt


def generate(model: GPT, tokenizer: Tokenizer, prompts: list[str], dials: torch.Tensor | None,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> list[str]:
    """Batch generation: one prompt and one dial (row of dials) per sample; returns the new text of each."""
    ids = [tokenizer.encode(p) for p in prompts]
    if len({len(i) for i in ids}) != 1:
        raise ValueError("batched prompts must have the same number of tokens")
    return generate_ids(model, tokenizer, torch.tensor(ids), dials, max_new_tokens, temperature, top_k, seed)


def generate_ids(model: GPT, tokenizer: Tokenizer, ids: torch.Tensor, dials: torch.Tensor | None,
                 max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None) -> list[str]:
    """Batch generation from prompt token ids (B, T0); returns the new text of each row."""
    tokens = list(generate_tokens(model, ids, dials, max_new_tokens, temperature, top_k, seed))
    return [tokenizer.decode(row) for row in torch.stack(tokens, dim=1).tolist()]


def stream_text(tokenizer: Tokenizer, tokens: Iterator[torch.Tensor]) -> Iterator[str]:
    """Text pieces of a single sequence as its tokens arrive. Byte-level BPE can end a token mid-character,
    so a piece is only released once it decodes cleanly."""
    ids, shown = [], 0
    for t in tokens:
        ids.append(int(t[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and len(text) > shown:
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(ids)
    if len(text) > shown:
        yield text[shown:]
