"""Prompt sets for SeND's tracking and for EigenScore: a file of short texts, tokenised like training.

Formats: `*.jsonl` (one object per line; the prompt is its "prompt" field, else its "text"; blank
lines are skipped), anything else is plain text with one prompt per non-blank line. A prompt is
tokenised as `<bos>` + its text, the layout documents have in training, so a question cut from a
training statement (exatrain.data.facts) is exactly the prefix the model saw.
"""

from __future__ import annotations

import json
from pathlib import Path

from exatrain.data.tokenizer import Tokenizer


def read_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """The first `limit` prompts of `path` (all when limit <= 0). Raises ValueError naming the line of a
    bad record, FileNotFoundError for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[str] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({exc})") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno} has no non-empty string 'prompt' or 'text' field")
        else:
            text = line
        prompts.append(text)
        if 0 < limit <= len(prompts):
            break
    return prompts


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], max_len: int = 0) -> list[list[int]]:
    """`<bos>` + tokens of each prompt, cut to `max_len` tokens (0: no limit)."""
    out = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(prompts)]
    return [ids[:max_len] if max_len > 0 else ids for ids in out]
