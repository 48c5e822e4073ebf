"""corpus: sources.yaml → curated documents + provenance → tokenizer → packed shards + data manifest.

Modules: sources (the sources file), licences (terms and release policy), readers, generators,
stages (normalise, quality, langid, toxicity, PII, opt-out), dedup, pipeline (parallel curation),
prepare (`communs data prepare`), shards, manifest, loader (PackedReader), seen, audit (diff,
exposure), optout, cli. See docs/corpus.md and docs/formats.md.
"""
