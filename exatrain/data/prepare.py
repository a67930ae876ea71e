"""`exatrain data prepare`: tokenize JSONL/text once, in parallel and outside training, into a Megatron
indexed dataset (`PREFIX.bin/.idx`) plus the `PREFIX.exatrain.json` sidecar that names the tokenizer.

Documents are read in input order by the main process, encoded in chunks by a pool of worker processes
(`imap`, so the output keeps input order) and written as they come back; memory follows the chunks in flight,
not the corpus. Training reads the result with `data.format=megatron data.megatron_prefixes=[PREFIX]`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from exatrain.data.dataset import PROGRESS_S
from exatrain.data.documents import DataStats, files_digest, read_documents, resolve_files
from exatrain.data.megatron import IndexedDatasetWriter, token_dtype, write_sidecar
from exatrain.data.tokenizer import Tokenizer, byte_tokenizer, encode_texts

logger = logging.getLogger("exatrain.data")

_CHUNK_CHARS = 1 << 22  # characters of text per task handed to a worker

_worker_tokenizer: Tokenizer | None = None


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, or the path of a tokenizer.json with <bos>, <eos>, <pad>."""
    return byte_tokenizer() if spec == "byte" else Tokenizer.load(spec)


def _init_worker(spec: str) -> None:
    """Pool workers encode with one thread each (N workers = N cores); alone, the tokenizer uses its own threads."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(spec)


def _encode_chunk(job: tuple[list[str], str]) -> list[np.ndarray]:
    texts, dtype = job
    return list(encode_texts(_worker_tokenizer, texts, np.dtype(dtype).type))


def _chunks(files: list[Path], stats: DataStats, text_key: str) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in read_documents(files, stats, text_key=text_key):
        chunk.append(doc.text)
        chars += len(doc.text)
        if chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _in_order(pool, jobs: Iterator, window: int) -> Iterator[list[np.ndarray]]:
    """The pool's results in job order with at most `window` chunks in flight (Pool.imap would read the whole
    corpus ahead into its task queue)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_encode_chunk, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare(inputs: list[str], output: str, tokenizer_spec: str, workers: int = 1, text_key: str = "text") -> dict:
    """Tokenize `inputs` (files or directories, as data.paths) into `output`.bin/.idx; returns the sidecar."""
    files = resolve_files(inputs)
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    stats = DataStats()
    writer = IndexedDatasetWriter(output, dtype.type)
    start = last_report = time.monotonic()
    n_tokens = 0
    jobs = ((chunk, dtype.name) for chunk in _chunks(files, stats, text_key))
    try:
        if workers > 1:
            # fork: the workers inherit the imports; the parent has not run the tokenizer's thread pool yet
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_spec,))
            results = _in_order(pool, jobs, 2 * workers)
        else:
            pool = None
            results = (list(encode_texts(tokenizer, texts, dtype.type)) for texts, _ in jobs)
        try:
            for arrays in results:
                for ids in arrays:
                    writer.add_document(ids)
                    n_tokens += len(ids)
                if time.monotonic() - last_report > PROGRESS_S:
                    last_report = time.monotonic()
                    logger.info("prepare: %d documents, %d tokens, %.0f tokens/s", len(writer.lengths), n_tokens,
                                n_tokens / (last_report - start))
        finally:
            if pool is not None:
                pool.terminate()
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    info = {
        "format": "megatron", "documents": len(writer.lengths), "tokens": n_tokens,
        "max_token_id": writer.max_token_id, "dtype": dtype.name,
        "tokenizer": {"digest": tokenizer.digest, "vocab_size": tokenizer.vocab_size, "source": tokenizer_spec},
        "inputs": [str(f) for f in files], "inputs_digest": files_digest(files), "text_key": text_key,
        "stats": stats.to_dict(),
    }
    write_sidecar(output, info)
    logger.info("%s", stats.report())
    logger.info("prepare: wrote %s.bin/.idx: %d documents, %d tokens (%s) in %.1fs", output, info["documents"],
                n_tokens, dtype.name, time.monotonic() - start)
    return info
