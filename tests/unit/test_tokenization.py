"""The model's Rust tokenizer, called directly, gives what transformers' wrapper gives.

Counts, offsets (the chunker's) and truncated ids (the forward pass's) on texts of every kind
(empty, whitespace, accents and combining marks, CJK, emoji, control characters, over the
model's limit), and the vectors against `SentenceTransformer.encode` on the same texts.
"""

from __future__ import annotations

import numpy as np
import pytest

from processors.embedder import DirectTokenizer

TEXTS = [
    "", " ", "a", "Reset a password in the settings page.",
    "cafe\u0301 au lait, naïve façade, Ünïcödé", "東京は日本の首都です。", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧",
    "tabs\tand\nnew lines\r\n", "x" * 700, " ".join(f"word{i}" for i in range(400)),
    "URL https://example.com/a?b=c&d=e#f and e-mail a.b@c.de", "numbers 3.14159 1,000,000 -42",
]


@pytest.fixture(scope="module")
def model():
    from processors.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(device="cpu")


def test_counts_offsets_and_ids_are_the_wrappers(model):
    tokens = DirectTokenizer.for_model(model._tokenizer, max_tokens=model.max_tokens)
    assert tokens is not None
    wrapper = model._tokenizer
    assert tokens.count(TEXTS) == [len(ids) for ids in wrapper(TEXTS, add_special_tokens=True, truncation=False)["input_ids"]]
    offsets = wrapper(TEXTS, add_special_tokens=False, truncation=False, return_offsets_mapping=True)["offset_mapping"]
    assert tokens.offsets(TEXTS) == [[(int(a), int(b)) for a, b in spans] for spans in offsets]
    cut = wrapper(TEXTS, add_special_tokens=True, truncation=True, max_length=model.max_tokens)["input_ids"]
    assert tokens.ids(TEXTS) == [list(ids) for ids in cut]
    assert max(len(ids) for ids in tokens.ids(TEXTS)) == model.max_tokens


def test_the_vectors_are_sentence_transformers_own(model):
    texts = [t for t in TEXTS if t.strip()]
    ours = model.embed(texts).vectors
    theirs = model._model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert model.embed(texts).truncated == [n > model.max_tokens for n in model.count_tokens(texts)]
