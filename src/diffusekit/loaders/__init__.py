"""Adapters loaded onto pipelines: textual-inversion embeddings and LoRA weights (diffusers' loader mixins)."""
