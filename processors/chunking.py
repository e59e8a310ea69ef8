"""Long documents as chunks that fit the model, cut at the best boundary the tokens allow.

Owns: choosing chunk spans from one tokenization of a text (the token offsets the model's
own tokenizer gives). Must not: tokenize, embed or do I/O; the caller brings the offsets,
so the same encoding serves truncation flags, chunking and batch planning.

Why not `semantic-text-splitter`: it re-tokenizes every candidate span itself (we already
hold the offsets), it is one more compiled wheel to ship to GPU hosts without a network,
and what we need of it (a token cap, overlap, paragraph > sentence > word boundaries,
character spans) is this short module. The comparison is in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# A cut is made where the text between two tokens says the most about structure.
_PARAGRAPH, _LINE, _SENTENCE, _CLAUSE, _WORD, _ANYWHERE = 5, 4, 3, 2, 1, 0
_SENTENCE_ENDS = (".", "!", "?", "。", "！", "？", "…")
_CLAUSE_ENDS = (",", ";", ":", "，", "；", "：", ")", "]")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    start: int
    """Character span of the chunk in the document's (normalized) text."""
    end: int
    tokens: int
    """Content tokens (without the model's special tokens)."""


def _boundary(text: str, before_end: int, after_start: int) -> int:
    """How good a cut is between a token ending at `before_end` and one starting at `after_start`."""
    gap = text[before_end:after_start]
    if "\n\n" in gap:
        return _PARAGRAPH
    if "\n" in gap:
        return _LINE
    if not gap:
        return _ANYWHERE  # inside a word (or CJK run without spaces)
    last = text[before_end - 1] if before_end > 0 else ""
    if last in _SENTENCE_ENDS or (last in "\"')”’" and before_end > 1 and text[before_end - 2] in _SENTENCE_ENDS):
        return _SENTENCE
    if last in _CLAUSE_ENDS:
        return _CLAUSE
    return _WORD


def plan_chunks(
    text: str, offsets: Sequence[tuple[int, int]], *, max_tokens: int, overlap_tokens: int = 0
) -> list[Chunk]:
    """Cut `text` into chunks of at most `max_tokens` content tokens.

    `offsets` are the character spans of the text's content tokens, in order (special
    tokens excluded). A text that fits is one chunk spanning all of it. Otherwise each
    chunk ends at the best boundary (paragraph, line, sentence, clause, word, anywhere) in
    the last half of its window, and the next starts `overlap_tokens` tokens earlier.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    overlap = max(0, min(overlap_tokens, max_tokens // 2))
    n = len(offsets)
    if n <= max_tokens:
        return [Chunk(text=text, start=0, end=len(text), tokens=n)]
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + max_tokens, n)  # exclusive token index
        if end < n:
            best, best_score = end, -1
            # Search the window's last half only: chunks stay near the cap.
            for cut in range(end, start + max(1, max_tokens // 2) - 1, -1):
                score = _boundary(text, offsets[cut - 1][1], offsets[cut][0])
                if score > best_score:
                    best, best_score = cut, score
                    if score == _PARAGRAPH:
                        break
            end = best
        char_start = offsets[start][0] if start > 0 else 0
        char_end = offsets[end - 1][1] if end < n else len(text)
        chunks.append(Chunk(text=text[char_start:char_end], start=char_start, end=char_end, tokens=end - start))
        if end >= n:
            break
        start = max(start + 1, end - overlap)
    return chunks
