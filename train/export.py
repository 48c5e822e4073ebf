"""A phase's weights as a Hugging Face Llama folder: RUN/export/<phase>/, what every release is made of.

    OUT/model.safetensors         weights under LlamaForCausalLM names (fp32 or the given dtype)
    OUT/config.json               a stock LlamaConfig (no custom code, no trust_remote_code)
    OUT/generation_config.json    bos/eos/pad ids, the chat end-of-turn token as a stop token
    OUT/tokenizer.json, tokenizer_config.json, chat_template.jinja, tokenizer.model
    OUT/communs.json              our ModelConfig and where the weights came from

The weights and configs are model.hf's, the tokenizer files the tokenizer's. The folder is built under
a temporary name next to OUT and swapped into place (common.io.replace_dir), so a crash never leaves a
half-written export behind, nor a moment without one.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

from common.io import replace_dir
from model.hf import save_hf
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
        save_hf(state_dict, model_cfg, tmp, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                stop_ids=[tok.eos_id, tok.im_end_id], dtype=dtype, provenance=provenance)  # fmt: skip
        tok.export_hf(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out_dir)


def consolidated_state_dict(ckpt_root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint: ZeRO's fp32 partitions merged (stages 1-3), or the module (0)."""
    if zero_stage == 0:
        # weights_only: DeepSpeed's model-states file holds tensors, plain containers and strings only.
        states = ckpt_root / tag / "mp_rank_00_model_states.pt"
        sd = torch.load(states, map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress report per call
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
