"""lm-evaluation-harness adapter: our exported model as an `lm_eval` LM, and our local tasks.

`CommunsLM` answers the harness's three request types with our own model (model.llama.Transformer +
tokenizer.Tokenizer loaded from an export folder), not through transformers, so the harness is a
real client of what we release:

- `loglikelihood(context, continuation)`: the exact log-probability of the continuation's tokens
  after the context, and whether greedy decoding would have produced them. Every sequence starts
  with BOS, as documents do in training. The context is cut on the left when context + continuation
  exceed max_seq_len. Requests are sorted by length and batched under a token budget.
- `loglikelihood_rolling(text)`: the log-probability of a whole text, scored in windows of
  max_seq_len tokens; each window after the first scores `stride` new tokens conditioned on the
  tokens before them (max_seq_len - stride tokens of context), so every token is scored once.
- `generate_until(context, {until, max_gen_toks})`: greedy decoding with model.generate.generate,
  cut at the first `until` string.

Log-probabilities are computed over the padded vocabulary (as the training loss and the HF export
do) in float64. `run_tasks` runs tasks found in eval/tasks/ only (never the harness's built-in
tasks, which would be downloaded).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from lm_eval.api.model import LM

from common.errors import UserError
from model.generate import generate
from model.llama import Transformer
from tokenizer import Tokenizer

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class CommunsLM(LM):
    """An lm-eval LM over our Transformer and Tokenizer (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tok: Tokenizer,
        *,
        batch_tokens: int = 8192,
        batch_size: int = 16,
        rolling_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tok = tok
        self.max_length = model.cfg.max_seq_len
        self.batch_tokens = batch_tokens  # loglikelihood: tokens per forward (bounds the logits' memory)
        self.batch_size = batch_size  # generate_until: prompts per generate call
        self.rolling_stride = rolling_stride or max(1, self.max_length // 2)
        if not 1 <= self.rolling_stride <= self.max_length:
            raise ValueError(f"rolling_stride={rolling_stride} must be in [1, max_seq_len={self.max_length}]")

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, device: str | None = None, **kwargs) -> CommunsLM:
        from eval.generation import load_model

        model, tok = load_model(export_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tok, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- loglikelihood ------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS, continuation ids). The continuation is tokenised together with the
        context, as the model would read the text; a space ending the context moves to the
        continuation (the harness's convention: " Paris" is one word token)."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.tok.encode(context) if context else []
        whole = self.tok.encode(context + continuation)
        return [self.tok.bos_id] + ctx, whole[len(ctx) :]

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of log p(continuation | context), whether
        every continuation token is the argmax). The context is cut on the left to fit max_seq_len."""
        W = self.max_length
        rows = []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError(
                    "score_tokens: the context and the continuation need at least one token each"
                )
            if len(cont) > W:
                raise UserError(f"a continuation of {len(cont)} tokens does not fit max_seq_len={W}")
            full = (ctx + cont)[-(W + 1) :]  # inputs full[:-1] (at most W tokens), targets full[1:]
            rows.append(full)
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: little padding
        start = 0
        while start < len(order):
            longest = len(rows[order[start]]) - 1
            batch = order[start : start + max(1, self.batch_tokens // longest)]
            start += len(batch)
            inputs = torch.zeros(len(batch), longest, dtype=torch.long)  # right padding: causal, so harmless
            for r, i in enumerate(batch):
                inputs[r, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            logits = self.model(inputs.to(self.device)).logits  # (b, T, V)
            for r, i in enumerate(batch):
                n_cont, n_in = len(pairs[i][1]), len(rows[i]) - 1
                # Input position j predicts token j + 1: the continuation is predicted by the last n_cont inputs.
                logp = logits[r, n_in - n_cont : n_in].double().log_softmax(-1)  # (n_cont, V)
                target = torch.tensor(rows[i][-n_cont:], device=logp.device)
                total = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs)

    # -- loglikelihood_rolling ----------------------------------------------------------------------

    def rolling_windows(self, n_tokens: int) -> list[tuple[int, int, int]]:
        """Windows over [BOS] + n_tokens tokens, as (first input, first target, end) positions:
        inputs seq[first input:end - 1] (at most max_seq_len), scored targets seq[first target:end].
        The scored ranges cover 1..n_tokens exactly once."""
        W, S = self.max_length, self.rolling_stride
        windows, a = [], 1
        while a <= n_tokens:
            b = min(n_tokens + 1, W + 1 if a == 1 else a + S)
            windows.append((max(0, b - 1 - W), a, b))
            a = b
        return windows

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        pairs, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args[:1]
            seq = [self.tok.bos_id] + self.tok.encode(text)
            for lo, a, b in self.rolling_windows(len(seq) - 1):
                pairs.append((seq[lo:a], seq[a:b]))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self.score_tokens(pairs)):
            totals[k] += logp
        return totals

    # -- generate_until -----------------------------------------------------------------------------

    def generate_until(self, requests: list) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0):
                raise UserError(
                    "generate_until: communs evaluates greedily (do_sample/temperature unsupported)"
                )
            keep = self.max_length - max_new  # the prompt is cut on the left to leave room for the answer
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [([self.tok.bos_id] + self.tok.encode(requests[i].args[0]))[-keep:] for i in batch]
                outs = generate(self.model, prompts, max_new, stop_ids=(self.tok.eos_id,))
                for i, out in zip(batch, outs):
                    results[i] = cut_at(self.tok.decode(out), until)
        return results  # type: ignore[return-value]


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any of the `until` strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def available_tasks(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Task names defined by the YAML files in eval/tasks/."""
    names = []
    for path in sorted(tasks_dir.glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            # !function tags point at python callables: read the names only, resolve nothing.
            config = yaml.load(f, Loader=_NameOnlyLoader)
        if isinstance(config, dict) and "task" in config:
            names.append(config["task"])
    return names


class _NameOnlyLoader(yaml.SafeLoader):
    pass


_NameOnlyLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def run_tasks(
    export_dir: str | os.PathLike,
    tasks: list[str],
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    *,
    lm: CommunsLM | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run local lm-eval tasks on an exported model; return {task: {metric: value}} (and write the
    harness's full results as JSON to `out`). `lm` reuses an already loaded model."""
    known = available_tasks()
    unknown = [t for t in tasks if t not in known]
    if not tasks:
        raise UserError(f"no task given; available: {', '.join(known)}")
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)}; available: {', '.join(known)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: expected a positive number of documents, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = lm or CommunsLM.from_export(export_dir)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    raw = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=0
    )
    scores = {
        task: {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if key not in ("alias", "sample_len") and "_stderr" not in key and isinstance(value, (int, float))
        }
        for task, metrics in raw["results"].items()
    }
    for task, metrics in scores.items():
        log(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if math.isfinite(v)))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"export": str(export_dir), "limit": limit, "scores": scores, "results": raw["results"]},
                f,
                indent=1,
                ensure_ascii=False,
                default=str,
            )
        os.replace(tmp, out)
    return scores
