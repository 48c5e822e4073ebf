"""A small real corpus (excerpts of the demo novels and GSM8K train) written as a sources file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"

NOVELS = [
    ("Maupassant_UneVie-rd0056.txt", "rd0056"),
    ("About_OreilleCassee-rd0730.txt", "rd0730"),
    ("Aurevilly_HistoireSansNom-rd0006.txt", "rd0006"),
    ("Rachilde_MonsieurVenus-rd0734.txt", "rd0734"),
]


def excerpt(name: str, start: int, n_chars: int) -> str:
    text = (DEMO / "roman19" / "txt" / name).read_text(encoding="utf-8")
    lines = text[start : start + n_chars].split("\n")
    return "\n".join(lines[1:-1])  # whole lines only


def write_corpus(
    root: Path, extra_sources: str = "", release: str = "Apache-2.0", novel_chars: int = 6000
) -> Path:
    """A sources file over 4 novel excerpts (text, metadata.csv), 40 GSM8K train lines (jsonl) and a
    generator; returns its path."""
    (root / "novels").mkdir(parents=True, exist_ok=True)
    for k, (name, _) in enumerate(NOVELS):
        (root / "novels" / name).write_text(excerpt(name, 5000 + 1000 * k, novel_chars), encoding="utf-8")
    csv = (DEMO / "roman19" / "metadata.csv").read_text(encoding="utf-8")
    (root / "novels" / "metadata.csv").write_text(csv, encoding="utf-8")
    gsm = (DEMO / "gsm8k" / "train-excerpt.jsonl").read_text(encoding="utf-8").split("\n")[:40]
    (root / "qa.jsonl").write_text("\n".join(gsm) + "\n", encoding="utf-8")
    (root / "optout.jsonl").write_text("", encoding="utf-8")
    sources = root / "sources.yaml"
    sources.write_text(
        textwrap.dedent(
            f"""\
            seed: 0
            release: {{licence: {release}}}
            optout: optout.jsonl
            pipeline:
              chunk_chars: 2500
            split: {{val_fraction: 0.2}}
            tokenizer: {{vocab_size: 400, sample_bytes_per_source: 100000}}
            shards: {{max_tokens: 4096}}
            sources:
              - id: novels
                format: text
                paths: [novels/*.txt]
                id_pattern: '-(rd\\d{{4}})\\.txt$'
                metadata: {{csv: novels/metadata.csv, key: idno, fields: {{author: author-name, title: title}}}}
                licence: public-domain
                language: fr
                domain: literature
                url: https://github.com/cligs/textbox
              - id: qa
                format: jsonl
                paths: [qa.jsonl]
                template: "Question: {{question}}\\nAnswer:\\n{{answer}}"
                licence: MIT
                language: en
                domain: maths
                url: https://github.com/openai/grade-school-math
                stages:
                  quality: {{min_words: 15, min_mean_word_length: 2.0, min_alpha_words: 0.5, max_digit_ratio: 0.4,
                            max_symbol_word_ratio: 0.5, max_top_2gram: 0.4, max_top_3gram: 0.4, max_top_4gram: 0.4,
                            max_dup_5gram: 0.6, max_dup_7gram: 0.6, max_dup_10gram: 0.6}}
                  langid: {{min_prob: 0.3}}
              - id: chat
                kind: chat
                generator: edu_chat
                params: {{n_arithmetic: 12, gsm8k: qa.jsonl, n_gsm8k: 8, seed: 0}}
                licence: MIT
                language: [fr, en]
                domain: education
                url: https://example.org/communs
                stages:
                  quality: false
                  langid: false
                  dedup: {{near: false}}
            """
        )
        + extra_sources,
        encoding="utf-8",
    )
    return sources


@pytest.fixture
def make_corpus():
    return write_corpus


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 400-piece tokenizer trained once on real French and English text."""
    from tokenizer import train_tokenizer

    texts = [excerpt(name, 0, 40000) for name, _ in NOVELS]
    texts += [json.loads(line)["question"] for line in (DEMO / "gsm8k" / "train-excerpt.jsonl").open()][:300]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), 400, seed=0)


def _datasketch_duplicates(items, threshold: float, num_perm: int) -> dict[int, tuple[str, str]]:
    """The dedup decisions as datasketch takes them (the code `DedupIndex` replaced): a dict of first
    digests, then MinHashLSH.query, each candidate confirmed by MinHash.jaccard, the earliest match
    named. items: (doc id, sha256 or None, signature or None)."""
    from datasketch import MinHashLSH

    from corpus.dedup import _minhash

    removed, first_by_hash, kept, order = {}, {}, {}, {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, (doc_id, sha, sig) in enumerate(items):
        if sha is not None:
            if sha in first_by_hash:
                removed[i] = ("dedup.exact", first_by_hash[sha])
                continue
            first_by_hash[sha] = doc_id
        if sig is None:
            continue
        m = _minhash(num_perm, sig)
        matches = [c for c in lsh.query(m) if kept[c].jaccard(m) >= threshold]
        if matches:
            removed[i] = ("dedup.near", min(matches, key=order.__getitem__))
            continue
        lsh.insert(doc_id, m)
        kept[doc_id], order[doc_id] = m, i
    return removed


@pytest.fixture
def datasketch_duplicates():
    """`_datasketch_duplicates(items, threshold, num_perm)`: the reference dedup decisions."""
    return _datasketch_duplicates
