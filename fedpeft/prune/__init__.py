"""Structured pruning (heads and FFN channels) for LLaMA-family and GPT-2 models."""
