"""Llama-style decoder, attention backends, generation."""
