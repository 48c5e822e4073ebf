"""A small tokenized dataset for the train tests: a tokenizer trained on the demo texts, shards written with
corpus.shards.write_shard (train and val splits; two text sources and one chat source with loss masks),
and a data manifest with the fields docs/architecture.md lists. Built once per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from corpus.manifest import write_manifest
from corpus.shards import sha256_file, write_shard
from tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"
VOCAB = 512


def _texts() -> dict[str, list[str]]:
    def paragraphs(path: Path, n: int) -> list[str]:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if 40 < len(line) < 3000][:n]

    novels = sorted((DEMO / "nouvelles19" / "txt").glob("*.txt"))
    return {
        "fr": [p for path in novels[:3] for p in paragraphs(path, 120)],
        "en": [
            p for p in (DEMO / "shakespeare" / "tinyshakespeare-excerpt.txt").read_text().split("\n\n") if p
        ][:300],
    }


def _chats(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        a, b = 3 + i % 17, 5 + (7 * i) % 23
        out.append(
            [
                {"role": "user", "content": f"Combien font {a} + {b} ?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}. La réponse est {a + b}."},
            ]
        )
    return out


def build_dataset(out: Path) -> Path:
    """Tokenizer + shards + manifest under `out`; return the manifest path."""
    texts = _texts()
    tok_path = train_tokenizer([t for ts in texts.values() for t in ts], out / "tokenizer", VOCAB, seed=0)
    tok = Tokenizer.load(tok_path)
    docs = {
        src: [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(ts)] for src, ts in texts.items()
    }
    chat_docs = []
    for conv in _chats(400):
        ids, mask = tok.encode_chat(conv)
        chat_docs.append((ids + [tok.eos_id], mask + [0]))
    sources = {}
    for src, kind, items in (
        ("fr", "text", docs["fr"]),
        ("en", "text", docs["en"]),
        ("chat", "chat", chat_docs),
    ):
        n_val = max(2, len(items) // 20)
        splits = {}
        for split, part in (("val", items[:n_val]), ("train", items[n_val:])):
            rel = f"shards/{src}/{split}/00000"
            rec = write_shard(out / rel, part)
            digest = sha256_file(f"{out / rel}.json")
            splits[split] = {
                "n_docs": rec["n_docs"],
                "n_tokens": rec["n_tokens"],
                "shards": [
                    {"path": rel, "n_docs": rec["n_docs"], "n_tokens": rec["n_tokens"], "has_mask": rec["has_mask"],
                     "sha256": digest}
                ],
            }  # fmt: skip
        phases = ["sft"] if kind == "chat" else ["pretrain", "anneal", "context-extension"]
        sources[src] = {
            "licence": "public-domain", "language": src if src != "chat" else "fr", "domain": "test",
            "kind": kind, "conditions": {"commercial": True, "attribution": False, "share_alike": False,
                                         "no_derivatives": False, "phases": phases},
            "splits": splits,
        }  # fmt: skip
    manifest = {
        "tokenizer": {"path": "tokenizer/tokenizer.model", "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "sources": sources,
    }  # fmt: skip
    path = out / "manifest.json"
    write_manifest(manifest, path)
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """The manifest path of the shared test dataset."""
    return build_dataset(tmp_path_factory.mktemp("train-data"))


TINY_RECIPE = """
name: tiny-test
seed: 0
model: {{size: tiny, overrides: {{vocab_size: {vocab}}}}}
tokenizer: {{path: {tok}}}
data: {{manifest: {manifest}}}
precision: fp32
deepspeed: {{zero_stage: 1}}
checkpoint: {{interval: 2, keep_last: 2}}
logging: {{interval: 1, val_tokens: 512}}
phases:
  - name: first
    kind: pretrain
    mixture: {{fr: 0.6, en: 0.4}}
    tokens: 2048
    seq_len: 64
    batch_tokens: 256
    micro_batch_size: 2
    lr: {{schedule: wsd, peak: 3.0e-3, warmup_tokens: 512, decay_fraction: 0.25}}
  - name: second
    kind: sft
    mixture: {{chat: 1.0}}
    tokens: 1536
    seq_len: 128
    rope_theta: 40000.0
    batch_tokens: 512
    micro_batch_size: 2
    lr: {{schedule: cosine, peak: 2.0e-3}}
    optimizer: reset
"""


@pytest.fixture
def tiny_recipe(dataset, tmp_path) -> Path:
    """A 2-phase recipe on the test dataset: 8 steps of 4 sequences of 64 tokens, then 3 SFT steps of 4
    sequences of 128 tokens with another RoPE base (the model's shape and settings change between phases)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        TINY_RECIPE.format(
            vocab=VOCAB, tok=dataset.parent / "tokenizer" / "tokenizer.model", manifest=dataset
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT = free_port()


@pytest.fixture
def single_rank(monkeypatch):
    """This pytest process as rank 0 of a 1-process group (gloo), for in-process loop tests. The group
    is created by the first test that runs the loop and reused by the next ones (same port)."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(_PORT))
