"""Semantic content routing (issue 15, method `semantic`): which destination's example prompts a request is most
similar to, by cosine similarity of embeddings from an embedding model served by a ModelRoute.

No ML framework in the router: the examples' embeddings are one numpy matrix of unit rows, normalised once when
the index is built (once per serving table), so a request costs one matrix-vector product. The embeddings come
from outside (`/v1/embeddings` of a peer, possibly another route's router): every vector is checked (numbers
only, finite, one dimension throughout, not all zero) and an unusable answer raises `EmbeddingError`, which
the caller turns into the default destination with fallback `unavailable` (api.orchestration.FALLBACK_HEADER).

    index = await SemanticIndex.build(content_model.destinations, embed)   # embed: list[str] -> vectors
    hit = index.nearest(await embed_one(request_text))                     # ("sql", 0.83) or None
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loraplane.api.orchestration import WireDestination

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]

# Texts per embedding request while building an index: a destination may have 256 examples and a content model
# 64 destinations, and one /v1/embeddings request with 16,384 inputs would be one unbounded body each way.
EMBED_BATCH = 32
# The widest embedding accepted (largest common models are 4,096; some reach 8,192).
MAX_DIMENSION = 16384
# The most numbers one index holds (examples x dimension): 64 MiB as float32, inside the router pod's memory
# (RouterSpec.memory, default 1Gi). The API's bounds (64 destinations x 256 examples) at dimension 1,024 fit.
MAX_INDEX_VALUES = 1 << 24


class EmbeddingError(ValueError):
    """The embedding model's answer cannot be used (wrong count or shape, a non-number, NaN/Inf, a zero
    vector, a dimension other than the index's, too large). The router answers with the default destination
    and counts fallback `unavailable`."""


class DimensionMismatch(EmbeddingError):
    """A vector's length is not the index's dimension: within one build, the embedding model answers
    inconsistently; for a request, the embedding model changed (another model behind the same public name) since
    the index was built, so the caller should drop the index and build it again rather than fall back forever."""


def as_unit_vector(vector: object, dimension: int | None = None, what: str = "the embedding") -> np.ndarray:
    """`vector` (a JSON-decoded list of numbers) as a float32 unit vector.

    `dimension`: the length it must have (None: any from 1 to MAX_DIMENSION). Raises EmbeddingError when it is
    not a flat list of numbers (strings, nulls, nested lists and a list of booleans only are refused; numpy
    reads a boolean among numbers as 0 or 1), has the wrong length, holds NaN or infinity, or has norm 0 (no direction to compare)."""
    if not isinstance(vector, (list, tuple)):
        raise EmbeddingError(f"{what} is a {type(vector).__name__}, not a list of numbers")
    if not vector:
        raise EmbeddingError(f"{what} is empty")
    if len(vector) > MAX_DIMENSION:
        raise EmbeddingError(f"{what} has {len(vector)} numbers, more than the {MAX_DIMENSION} accepted")
    if dimension is not None and len(vector) != dimension:
        raise DimensionMismatch(f"{what} has {len(vector)} numbers where the index's have {dimension}: the "
                             "embedding model answers inconsistently, or changed since the index was built")
    try:
        # No dtype: numpy infers one, so strings, None, nested lists and bools are told apart from numbers.
        raw = np.asarray(vector)
    except (ValueError, TypeError, OverflowError) as exc:   # ragged nesting, or an int too large for numpy
        raise EmbeddingError(f"{what} is not a list of numbers: {exc}") from None
    if raw.ndim != 1 or raw.dtype.kind not in "iuf":
        raise EmbeddingError(f"{what} is not a flat list of numbers (numpy reads it as {raw.dtype}, "
                             f"{raw.ndim} dimensions)")
    values = raw.astype(np.float64)
    if not np.isfinite(values).all():
        raise EmbeddingError(f"{what} holds NaN or infinity")
    # Scaled by its largest component first, so huge components cannot overflow the norm nor tiny ones vanish.
    scale = float(np.abs(values).max())
    if scale == 0.0:
        raise EmbeddingError(f"{what} is a zero vector: it has no direction to compare")
    values /= scale
    return (values / np.linalg.norm(values)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SemanticIndex:
    """Every example prompt of a content model's destinations, embedded and normalised.

    `models[i]` is the destination model of row i of `matrix` (float32, shape (examples, dimension), unit rows).
    An index with no examples (no destination has any) has `dimension` 0 and never chooses."""

    models: tuple[str, ...]
    matrix: np.ndarray
    dimension: int

    @classmethod
    async def build(cls, destinations: Sequence[WireDestination], embed: Embed,
                    batch_size: int = EMBED_BATCH) -> SemanticIndex:
        """Embed each destination's `examples` with `embed` (awaited once per batch of at most `batch_size`
        texts, sequentially; a text two examples share is embedded once) and return the index.

        Raises EmbeddingError when an answer is unusable (not one vector per text, or a vector `as_unit_vector`
        refuses, or dimensions differ between vectors, or the index would exceed MAX_INDEX_VALUES numbers);
        whatever `embed` raises (connection errors, timeouts) passes through unchanged."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        rows: list[tuple[str, str]] = [(d.model, text) for d in destinations for text in d.examples]
        texts = list(dict.fromkeys(text for _, text in rows))   # unique, in first-seen order
        if not texts:
            return cls(models=(), matrix=np.zeros((0, 0), np.float32), dimension=0)
        unit: dict[str, np.ndarray] = {}
        dimension: int | None = None
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            answer = await embed(chunk)
            if not isinstance(answer, (list, tuple)) or len(answer) != len(chunk):
                got = len(answer) if isinstance(answer, (list, tuple)) else type(answer).__name__
                raise EmbeddingError(f"asked for {len(chunk)} embeddings, got {got}")
            for i, (text, vector) in enumerate(zip(chunk, answer)):
                v = as_unit_vector(vector, dimension, f"the embedding of example {start + i + 1}")
                dimension = len(v)
                if len(rows) * dimension > MAX_INDEX_VALUES:
                    raise EmbeddingError(f"{len(rows)} examples x {dimension} dimensions is over the "
                                         f"{MAX_INDEX_VALUES} numbers an index holds: use fewer examples or an "
                                         "embedding model with smaller vectors")
                unit[text] = v
        matrix = np.stack([unit[text] for _, text in rows])
        return cls(models=tuple(model for model, _ in rows), matrix=matrix, dimension=dimension or 0)

    def __len__(self) -> int:
        return len(self.models)

    def nearest(self, vector: object) -> tuple[str, float] | None:
        """The destination model of the example most similar to `vector` (a request's embedding) and that
        cosine similarity (in [-1, 1]); None when the index has no examples. Ties go to the earlier example
        (destination order, then example order), as rules go to the first matching destination.

        Raises EmbeddingError when `vector` is unusable; DimensionMismatch (an EmbeddingError) when its dimension
        is not the index's (rebuild the index: the embedding model changed)."""
        if not self.models:
            return None
        v = as_unit_vector(vector, self.dimension, "the request's embedding")
        similarities = self.matrix @ v
        best = int(np.argmax(similarities))
        # float32 rounding can put a unit vector's product with itself a hair over 1.
        return self.models[best], min(1.0, max(-1.0, float(similarities[best])))
