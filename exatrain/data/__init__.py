"""Data pipeline: embedded corpus, tokenizer, packed resumable loaders, MeCo metadata (DESIGN.md §5)."""

from exatrain.data.batch import IGNORE_INDEX, Batch, split_micro
from exatrain.data.dataset import DataBundle, PackedLoader, build_data
from exatrain.data.documents import DataStats, Document, load_documents
from exatrain.data.meco import metadata_prompt
from exatrain.data.tokenizer import Tokenizer

__all__ = ["IGNORE_INDEX", "Batch", "DataBundle", "DataStats", "Document", "PackedLoader", "Tokenizer", "build_data",
           "load_documents", "metadata_prompt", "split_micro"]
