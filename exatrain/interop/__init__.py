"""Other tools' formats in and out of exatrain (Hugging Face transformers checkpoints: exatrain.interop.hf)."""
