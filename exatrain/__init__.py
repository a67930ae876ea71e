"""exatrain: composable 3D-parallel LLM pre-training."""

__version__ = "0.1.0"
