"""Checkpoint readers (GGUF, Hugging Face, Meta) and the canonical form they convert to."""
