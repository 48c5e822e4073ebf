"""The export is what educators load: transformers must read it with no custom code, same logits."""

import dataclasses
import json

import pytest
import torch

from model.hf import load_hf
from model.llama import SIZES, Transformer
from tokenizer import Tokenizer, train_tokenizer
from train.export import export_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, demo_texts):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(demo_texts, out, vocab_size=1024, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    cfg = dataclasses.replace(SIZES["tiny"], vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    out = tmp_path_factory.mktemp("export") / "model"
    export_hf(model.state_dict(), cfg, tokenizer_path, out, provenance={"run": "test"})
    return model, cfg, out


def test_export_folder_is_complete_and_stock(exported):
    _, _, out = exported
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "communs.json",
        "tokenizer.json",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config  # no custom code
    assert not list(out.parent.glob(".model.*")), "temporary folder left behind"


def test_transformers_loads_it_with_equal_logits(exported):
    model, cfg, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf.eval()
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert torch.allclose(ours[..., : cfg.vocab_size], theirs[..., : cfg.vocab_size], atol=1e-5, rtol=0)


def test_transformers_tokenizer_matches_ours(exported, tokenizer_path, demo_texts):
    _, _, out = exported
    ours = Tokenizer.load(tokenizer_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in demo_texts[:50]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_load_export_round_trips_the_weights(exported):
    model, cfg, out = exported
    cfg2, sd = load_hf(out)
    assert cfg2 == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(sd[name], tensor), name


def test_failed_export_leaves_nothing_behind(tmp_path, exported, tokenizer_path):
    model, cfg, _ = exported
    bad = {k: v for k, v in model.state_dict().items() if "layers.0." not in k}  # missing weights
    with pytest.raises(Exception):  # noqa: B017 - any error will do, what matters is the cleanup
        export_hf(bad, cfg, tokenizer_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_re_export_replaces_and_cleans_leftovers_of_killed_exports(tmp_path, exported, tokenizer_path):
    model, cfg, _ = exported
    out = tmp_path / "model"
    export_hf(model.state_dict(), cfg, tokenizer_path, out, provenance={"n": 1})
    (tmp_path / ".model.killed123").mkdir()  # a temporary folder of an export killed mid-write
    (tmp_path / ".model.old").mkdir()  # an old export moved aside by a kill mid-swap
    export_hf(model.state_dict(), cfg, tokenizer_path, out, provenance={"n": 2})
    assert json.loads((out / "communs.json").read_text())["provenance"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
