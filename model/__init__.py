"""The Llama-style decoder: llama.py (the model, read it first), ops.py (attention backends and fused
ops), hf.py (Hugging Face conversion), generate.py (KV-cache generation). See docs/model.md."""
