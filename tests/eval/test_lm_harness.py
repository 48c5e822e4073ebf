"""The lm-eval adapter against float64 references computed from the model's logits directly, and
the local tasks end to end on a tiny random model export."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from eval import lm_harness
from eval.lm_harness import CommunsLM, cut_at, run_tasks
from eval.tasks import make_data
from model.llama import SIZES, Transformer
from tokenizer import Tokenizer, train_tokenizer
from train.export import export_hf

ROOT = Path(__file__).resolve().parents[2]
DEMO_NOVEL = ROOT / "data" / "demo" / "roman19" / "txt" / "Maupassant_UneVie-rd0056.txt"
MAX_SEQ_LEN = 128
# The model computes in float32 and a batch's shape can change the last bits of its logits; an off-by-one
# window or target would be off by whole nats.
TOL = 1e-6


class Request:
    """What the harness hands an LM: an object with `args`."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lm_harness")
    paragraphs = [p for p in DEMO_NOVEL.read_text(encoding="utf-8").split("\n") if len(p) > 200][:400]
    tok_path = train_tokenizer(paragraphs, tmp / "tokenizer", 600, seed=0)
    vocab = Tokenizer.load(tok_path).vocab_size
    cfg = dataclasses.replace(SIZES["tiny"], vocab_size=vocab, max_seq_len=MAX_SEQ_LEN, attention="reference")
    torch.manual_seed(0)
    model = Transformer(cfg)
    return export_hf(model.state_dict(), cfg, tok_path, tmp / "export")


@pytest.fixture(scope="module")
def lm(export) -> CommunsLM:
    return CommunsLM.from_export(export, device="cpu", batch_tokens=300)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, in float64, from one forward over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()  # (T, V)
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_matches_the_logits(lm):
    tok, model = lm.tok, lm.model
    pairs = [
        ("Je suis né le 13 mai, dans une ville", " du Languedoc"),
        ("Mon père", " faisait le commerce des foulards."),
        ("", "La vieille Annou, notre cuisinière."),
        ("Il fallait pleurer, mon bon monsieur Eyssette,", " il fallait pleurer doublement."),
    ]
    results = lm.loglikelihood([Request(c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, results):
        ctx = [tok.bos_id] + (tok.encode(context) if context else [])
        cont = tok.encode(context + continuation)[len(ctx) - 1 :]
        ref = reference_logprobs(model, ctx + cont)[-len(cont) :]
        assert logp == pytest.approx(ref.sum().item(), abs=TOL)
        with torch.no_grad():
            argmax = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont) :].argmax(-1)
        assert greedy == (argmax.tolist() == cont)
    # A continuation that is the model's own greedy choice is reported as greedy.
    ctx = [tok.bos_id] + tok.encode("Mon père")
    with torch.no_grad():
        best = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    [(logp, greedy)] = lm.score_tokens([(ctx, [best])])
    assert greedy and logp == pytest.approx(reference_logprobs(model, ctx + [best])[-1].item(), abs=TOL)


def test_loglikelihood_truncates_a_long_context_on_the_left(lm):
    tok, model = lm.tok, lm.model
    ctx = [tok.bos_id] + tok.encode(DEMO_NOVEL.read_text(encoding="utf-8")[:3000])
    cont = tok.encode(" et la fabrique")
    assert len(ctx) > MAX_SEQ_LEN
    [(logp, _)] = lm.score_tokens([(ctx, cont)])
    kept = (ctx + cont)[-(MAX_SEQ_LEN + 1) :]
    assert logp == pytest.approx(reference_logprobs(model, kept)[-len(cont) :].sum().item(), abs=TOL)
    with pytest.raises(UserError, match=f"does not fit max_seq_len={MAX_SEQ_LEN}"):
        lm.score_tokens([(ctx[:2], ctx[: MAX_SEQ_LEN + 1])])


def test_loglikelihood_rolling_short_text_is_one_forward(lm):
    text = "C'est là que je suis venu au monde et que j'ai passé les premières années de ma vie."
    ids = [lm.tok.bos_id] + lm.tok.encode(text)
    assert len(ids) <= MAX_SEQ_LEN
    [total] = lm.loglikelihood_rolling([Request(text)])
    assert total == pytest.approx(reference_logprobs(lm.model, ids).sum().item(), abs=TOL)


def test_loglikelihood_rolling_long_text_scores_every_token_once(lm):
    text = DEMO_NOVEL.read_text(encoding="utf-8")[:450]
    ids = [lm.tok.bos_id] + lm.tok.encode(text)
    assert MAX_SEQ_LEN + 40 < len(ids) < 2 * MAX_SEQ_LEN
    # With stride 1 every token is conditioned on the max_seq_len tokens before it (or all of them):
    # one forward for the first max_seq_len targets, then one per target.
    naive = reference_logprobs(lm.model, ids[: MAX_SEQ_LEN + 1]).sum().item() + sum(
        reference_logprobs(lm.model, ids[j - MAX_SEQ_LEN : j + 1])[-1].item()
        for j in range(MAX_SEQ_LEN + 1, len(ids))
    )
    sliding = CommunsLM(lm.model, lm.tok, rolling_stride=1, batch_tokens=4096)
    [total] = sliding.loglikelihood_rolling([Request(text)])
    assert total == pytest.approx(naive, abs=TOL)
    # The default stride covers each token exactly once too.
    windows = lm.rolling_windows(len(ids) - 1)
    scored = [j for _, a, b in windows for j in range(a, b)]
    assert scored == list(range(1, len(ids)))
    assert all(b - 1 - lo <= MAX_SEQ_LEN for lo, _, b in windows)
    assert all(a - lo >= MAX_SEQ_LEN - lm.rolling_stride for lo, a, _ in windows[1:])  # context kept


def test_generate_until_is_greedy_and_stops_at_until(lm):
    from model.generate import generate

    context = "Je suis né le 13 mai"
    prompt = [lm.tok.bos_id] + lm.tok.encode(context)
    full = lm.tok.decode(generate(lm.model, [prompt], 20, stop_ids=(lm.tok.eos_id,))[0])
    [plain] = lm.generate_until([Request(context, {"until": [], "max_gen_toks": 20})])
    assert plain == full and len(full) > 4
    stop = full[2:4]  # a string the greedy text contains: the answer ends just before it
    [cut] = lm.generate_until([Request(context, {"until": [stop], "max_gen_toks": 20})])
    assert cut == full[: full.index(stop)] and stop not in cut
    assert cut_at("12 345.\n\nExercice 2", ["\n\n", "Exercice"]) == "12 345."


def test_run_tasks_on_every_local_task(export, lm, tmp_path):
    tasks = lm_harness.available_tasks()
    assert sorted(tasks) == ["communs_arith_choice_fr", "communs_maths_fr", "communs_ppl_fr"]
    out = tmp_path / "results.json"
    scores = run_tasks(export, tasks, limit=5, out=out, lm=lm, log=lambda line: None)
    expected = {
        "communs_maths_fr": {"exact_match"},
        "communs_arith_choice_fr": {"acc", "acc_norm"},
        "communs_ppl_fr": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    }
    assert {task: set(metrics) for task, metrics in scores.items()} == expected
    assert all(math.isfinite(v) for metrics in scores.values() for v in metrics.values())
    assert 0 <= scores["communs_maths_fr"]["exact_match"] <= 1
    assert scores["communs_ppl_fr"]["word_perplexity"] > 1
    assert out.exists()


def test_run_tasks_bad_task_name_lists_the_available_ones(export):
    with pytest.raises(
        UserError, match=r"unknown task nope; available: communs_arith_choice_fr, communs_maths_fr"
    ):
        run_tasks(export, ["communs_maths_fr", "nope"])


def test_task_data_is_deterministic(tmp_path):
    roman19 = make_data.ROMAN19 if (make_data.ROMAN19 / make_data.PPL_NOVEL).exists() else None
    for path in make_data.make_data(tmp_path, roman19):
        assert path.read_bytes() == (make_data.DATA / path.name).read_bytes(), path.name


def test_cli_eval_tasks(export, tmp_path, capsys):
    from communs import main

    out = tmp_path / "eval.json"
    assert (
        main(["eval", str(export), "--tasks", "communs_arith_choice_fr", "--limit", "3", "--out", str(out)])
        == 0
    )
    assert "communs_arith_choice_fr: acc" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["scores"]["communs_arith_choice_fr"]) == {"acc", "acc_norm"}
    assert main(["eval", str(export), "--tasks", "communs_maths_fr,gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "communs eval: error: unknown task gsm8k; available: "
        "communs_arith_choice_fr, communs_maths_fr, communs_ppl_fr"
    ]
    with pytest.raises(SystemExit):  # --tasks and --data are exclusive (argparse's usage error, exit 2)
        main(["eval", str(export), "--tasks", "communs_maths_fr", "--data", "qa.jsonl"])
