"""Export trained weights as a Hugging Face Llama folder: the format every release is made of.

    OUT/model.safetensors         weights under LlamaForCausalLM names (fp32 or the given dtype)
    OUT/config.json               a stock LlamaConfig (no custom code, no trust_remote_code)
    OUT/generation_config.json    bos/eos/pad ids, the chat end-of-turn token as a stop token
    OUT/tokenizer.json, tokenizer_config.json, chat_template.jinja, tokenizer.model
    OUT/communs.json              our ModelConfig and where the weights came from

The folder is built under a temporary name next to OUT and renamed into place, so a crash never
leaves a half-written export behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.hf import from_hf, hf_config, to_hf
from model.llama import ModelConfig
from tokenizer import Tokenizer


def export_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    provenance: dict | None = None,
) -> Path:
    """Write our state dict, config and tokenizer as a transformers-loadable folder; return it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(tokenizer_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf(state_dict, model_cfg).items()}
        if model_cfg.tie_embeddings:
            # safetensors refuses shared storage; transformers re-ties lm_head from the embeddings.
            hf_sd.pop("lm_head.weight", None)
        save_file(hf_sd, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf_config(model_cfg)
        config.update(
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            torch_dtype=str(dtype).removeprefix("torch."),
        )
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": tok.bos_id,
                "eos_token_id": sorted({tok.eos_id, tok.im_end_id}),
                "pad_token_id": tok.pad_id,
                "do_sample": False,
            },
        )
        tok.export_hf(tmp)
        _write_json(
            tmp / "communs.json",
            {"model_config": dataclasses.asdict(model_cfg), "provenance": provenance or {}},
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, out_dir)
    return out_dir


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Put a finished folder at out_dir; an existing export is moved aside first and removed only after.

    A kill at any point leaves either the old export or the new one at out_dir (plus a dot-named folder
    beside it, removed by the next export), never nothing.
    """
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # temporaries of killed exports
        shutil.rmtree(stale, ignore_errors=True)


def load_export(export_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an export back into our ModelConfig and state dict (safetensors only: nothing unpickled)."""
    export_dir = Path(export_dir)
    meta = json.loads((export_dir / "communs.json").read_text())
    cfg = ModelConfig(**meta["model_config"])
    hf_sd = load_file(export_dir / "model.safetensors")
    if cfg.tie_embeddings and "lm_head.weight" not in hf_sd:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    return cfg, from_hf(hf_sd, cfg)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
