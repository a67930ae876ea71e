"""Other tools' formats in and out of exatrain: Hugging Face transformers checkpoints (exatrain.interop.hf) and
Megatron indexed datasets (exatrain.data.megatron); their commands are in exatrain.interop.cli."""

EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # weight dtypes `exatrain export` writes
