"""How an embedding turns a sequence's final hidden states into one vector: the modes, and a build's choice."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Pooling(str, enum.Enum):
    """How an embedding request turns its final hidden states into one vector."""

    LAST = "last"  # the last token's
    MEAN = "mean"  # the mean over every token
    CLS = "cls"  # the first token's (BERT's [CLS])


@dataclass(frozen=True)
class PoolingConfig:
    """An encoder build's embedding recipe, read from sentence-transformers' files at compile time."""

    pooling: Pooling
    normalize: bool  # L2-normalise the pooled vector (sentence-transformers' Normalize module)
    # inputs longer than this many tokens are truncated, as sentence-transformers does (its max_seq_length)
    max_seq_length: int
    source: str  # where the recipe came from: the files read, or "default" (see compiler/pooling.py)

    def to_dict(self) -> dict:
        return {"pooling": self.pooling.value, "normalize": self.normalize, "max_seq_length": self.max_seq_length,
                "source": self.source}
