"""Load an exported model and answer prompts with it (plain text or the chat template)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import UserError
from model.generate import generate
from model.hf import load_hf
from model.llama import Transformer
from tokenizer import Tokenizer


def load_model(export_dir: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """Our model and tokenizer from an export folder (train/export.py) or anything with its files."""
    export_dir = Path(export_dir)
    for name in ("communs.json", "model.safetensors", "tokenizer.model"):
        if not (export_dir / name).exists():
            raise UserError(f"{export_dir}: not an exported model (missing {name})")
    cfg, state_dict = load_hf(export_dir)
    model = Transformer(cfg)
    model.load_state_dict(state_dict)
    model.eval()
    return model, Tokenizer.load(export_dir / "tokenizer.model")


@torch.no_grad()
def answer(
    model: Transformer,
    tok: Tokenizer,
    prompts: list[str],
    *,
    chat: bool = True,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Generate one completion per prompt; with `chat`, each prompt is a user turn."""
    if chat:
        ids = []
        for p in prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}
            ]
            ids.append(tok.encode_chat(messages, add_generation_prompt=True)[0])
        stop = (tok.im_end_id, tok.eos_id)
    else:
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
        stop = (tok.eos_id,)
    outputs = generate(
        model, ids, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=stop, seed=seed
    )
    return [tok.decode([t for t in out if t not in stop]) for out in outputs]
