"""`communs demo` end to end, at reduced size: every stage real, every artefact where docs say."""

import json
import shutil

import pytest
import torch

import communs
from app.demo import SAMPLE_QUESTIONS

transformers = pytest.importorskip("transformers")

SHORT = [
    "phases.pretrain.tokens=98304",  # 12 steps of 8192 tokens
    "phases.maths.tokens=49152",  # 6 steps
    "phases.education.tokens=49152",
    "checkpoint.interval=6",
    "logging.interval=2",
]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, demo_data, capsys):
    out = tmp_path / "demo"
    shutil.copytree(demo_data, out / "data")  # prepare is resumable: this copy is reused, not redone
    assert communs.main(["demo", "--out", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out

    run = out / "run"
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert set(manifest["sources"]) >= {"roman19", "gsm8k", "arithmetic", "edu_chat"}
    summary = json.loads((run / "summary.json").read_text())
    assert [p["name"] for p in summary["phases"]] == ["pretrain", "maths", "education"]
    pretrain = summary["phases"][0]
    assert pretrain["loss_end"] < pretrain["loss_start"] - 0.5, pretrain  # 12 steps from ~ln(8192)
    for phase in summary["phases"]:
        assert phase["loss_end"] < phase["loss_start"], phase  # the loss falls in each phase

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in metrics if "loss" in m} == {"pretrain", "maths", "education"}
    assert (run / "recipe.yaml").exists() and (run / "env.json").exists()
    assert (run / "checkpoints" / "latest").exists()
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["manifest_root_hash"] == manifest["root_hash"]

    for phase in ("pretrain", "maths", "education"):
        assert (run / "export" / phase / "model.safetensors").exists(), phase
    final = run / "export" / "education"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    messages = [{"role": "user", "content": "Combien font 2 + 2 ?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    from eval.generation import load_model

    ours, our_tok = load_model(final)
    assert list(ids) == our_tok.encode_chat(messages, add_generation_prompt=True)[0]
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.allclose(hf(x).logits, ours(x).logits, atol=1e-4, rtol=0)

    demo = json.loads((out / "demo.json").read_text())
    assert set(demo["answers"]) == set(SAMPLE_QUESTIONS)
    assert all(isinstance(a, str) for a in demo["answers"].values())
    assert "exported model:" in printed and "pretrain" in printed
