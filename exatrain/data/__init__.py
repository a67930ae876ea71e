"""Data pipeline: embedded corpus, tokenizer, packed resumable loaders, MeCo metadata (DESIGN.md §5)."""

from exatrain.data.dataset import Batch, DataBundle, PackedLoader, build_data
from exatrain.data.documents import DataStats, Document, load_documents
from exatrain.data.meco import metadata_enabled, metadata_prompt
from exatrain.data.tokenizer import Tokenizer

__all__ = ["Batch", "DataBundle", "DataStats", "Document", "PackedLoader", "Tokenizer", "build_data",
           "load_documents", "metadata_enabled", "metadata_prompt"]
