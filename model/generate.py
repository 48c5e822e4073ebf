"""Text generation with a KV cache: greedy, temperature, top-p (nucleus), stop tokens, a batch of prompts.

Prompts of different lengths are left-padded into one (B, P) batch: padding slots are marked invalid in
the cache (no real token attends to them) and each row's positions start at 0 on its first real token,
so every row computes what it would compute alone. Then one token per row per step: its keys and values
go into the next cache slot, and attention covers all slots so far (llama.KVCache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.llama import KVCache, Transformer


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from logits (B, V): argmax when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
    probability reaches top_p. Returns (B,) int64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # each (B, V)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ranked above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # back to vocabulary order
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)  # (B, 1); CPU generator: reproducible
    return choice[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[list[int]]:
    """For each prompt, the new tokens (at most max_new_tokens), stopping before the first stop token
    (which is not included). Greedy when temperature == 0; sampling is reproducible from `seed`."""
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt token {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: longest prompt {P} + max_new_tokens {max_new_tokens} > ModelConfig.max_seq_len={cfg.max_seq_len}"
        )
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    model.eval()

    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,) left padding per row
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, device=device)
    slots = torch.arange(P, device=device)[None, :]  # (1, P)
    positions = (slots - pad[:, None]).clamp(min=0)  # (B, P): 0 at each row's first real token
    cache = KVCache.empty(cfg, B, P + max_new_tokens, device, param.dtype)
    cache.valid[:, :P] = slots >= pad[:, None]

    generator = torch.Generator().manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_out = torch.full((B,), max_new_tokens, device=device)  # tokens kept per row
    logits = model(ids, positions, cache=cache).logits[:, -1]  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, : cfg.vocab_size], temperature, top_p, generator)  # padded ids excluded
        out[:, step] = token
        stopped = torch.isin(token, stops) & ~done
        n_out = torch.where(stopped, step, n_out)
        done |= stopped
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        cache.valid[:, cache.length] = True
        logits = model(token[:, None], next_pos[:, None], cache=cache).logits[:, -1]  # (B, V)
        next_pos = next_pos + 1
    model.train(was_training)
    return [out[i, : int(n_out[i])].tolist() for i in range(B)]
