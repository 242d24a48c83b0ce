"""router/semantic.py: the semantic index (cosine similarity of a request's embedding to destinations' examples)
and its refusal of unusable embeddings (the caller's fallback `unavailable`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loraplane.api.orchestration import WireDestination
from loraplane.router.semantic import (EMBED_BATCH, MAX_DIMENSION, MAX_INDEX_VALUES, DimensionMismatch, EmbeddingError,
                                       SemanticIndex, as_unit_vector)

# A toy embedding: fixed vectors per text, so similarities are known exactly.
VECTORS = {
    "sql one": [1.0, 0.0, 0.0], "sql two": [0.9, 0.1, 0.0],
    "support one": [0.0, 1.0, 0.0], "support two": [0.1, 0.9, 0.1],
    "chat one": [0.0, 0.0, 2.0],
}
DESTINATIONS = [
    WireDestination(model="sql", examples=["sql one", "sql two"]),
    WireDestination(model="support", examples=["support one", "support two"]),
    WireDestination(model="general", examples=["chat one"]),
    WireDestination(model="no-examples"),
]


class Recorder:
    """An `embed` callable answering from a dict and recording each batch it was asked for."""

    def __init__(self, vectors=None, answer=None):
        self.vectors = vectors or VECTORS
        self.answer = answer
        self.calls: list[list[str]] = []

    async def __call__(self, texts: list[str]):
        self.calls.append(list(texts))
        if self.answer is not None:
            return self.answer(texts)
        return [self.vectors[t] for t in texts]


async def test_nearest_is_the_destination_of_the_most_similar_example():
    index = await SemanticIndex.build(DESTINATIONS, Recorder())
    assert len(index) == 5 and index.dimension == 3
    assert index.nearest([0.95, 0.05, 0.0])[0] == "sql"
    assert index.nearest([0.0, 0.7, 0.2])[0] == "support"
    assert index.nearest([0.1, 0.0, 5.0])[0] == "general"
    # Exact similarity, scale-free (vectors are normalised): [0,0,2] vs [0,0,7] -> 1.
    model, similarity = index.nearest([0.0, 0.0, 7.0])
    assert model == "general" and similarity == pytest.approx(1.0, abs=1e-6)
    model, similarity = index.nearest([-1.0, -1.0, -1.0])  # everything points away: best is still returned
    assert -1.0 <= similarity < 0


async def test_a_tie_goes_to_the_earlier_destination():
    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0]}
    for order in (["b", "a"], ["a", "b"]):
        destinations = [WireDestination(model=m, examples=["x" if m == "a" else "y"]) for m in order]
        model, similarity = (await SemanticIndex.build(destinations, Recorder(vectors))).nearest([1.0, 1.0])
        assert model == order[0] and similarity == pytest.approx(math.sqrt(0.5), abs=1e-6)


async def test_identical_text_gets_similarity_one_to_its_own_destination():
    index = await SemanticIndex.build(DESTINATIONS, Recorder())
    for d in DESTINATIONS:
        for text in d.examples:
            model, similarity = index.nearest(VECTORS[text])
            assert model == d.model and similarity == pytest.approx(1.0, abs=1e-6) and similarity <= 1.0


async def test_no_examples_means_no_choice_and_no_embedding_requests():
    embed = Recorder()
    index = await SemanticIndex.build([WireDestination(model="a"), WireDestination(model="b")], embed)
    assert index.nearest([1.0, 2.0]) is None and len(index) == 0 and embed.calls == []
    assert (await SemanticIndex.build([], embed)).nearest([1.0]) is None


async def test_build_embeds_in_bounded_batches_and_each_text_once():
    texts = [f"t{i}" for i in range(2 * EMBED_BATCH + 3)]
    vectors = {t: [1.0, float(i)] for i, t in enumerate(texts)}
    # The same text under two destinations is embedded once but indexed for both (first wins a tie).
    destinations = [WireDestination(model="a", examples=texts), WireDestination(model="b", examples=texts[:5])]
    embed = Recorder(vectors)
    index = await SemanticIndex.build(destinations, embed)
    assert [len(c) for c in embed.calls] == [EMBED_BATCH, EMBED_BATCH, 3]
    assert sum(embed.calls, []) == texts
    assert len(index) == len(texts) + 5 and index.nearest(vectors["t2"])[0] == "a"
    embed = Recorder(vectors)
    await SemanticIndex.build(destinations, embed, batch_size=10)
    assert max(len(c) for c in embed.calls) == 10
    with pytest.raises(ValueError, match="batch_size"):
        await SemanticIndex.build(destinations, embed, batch_size=0)


# Every unusable shape of an embedding an untrusted peer can send (JSON-decoded), refused with a message.
BAD_VECTORS = [
    (None, "not a list"),
    ("0.1 0.2", "not a list"),
    ({"embedding": [1.0]}, "not a list"),
    ([], "empty"),
    ([0.0, 0.0, 0.0], "zero vector"),
    ([1.0, float("nan"), 0.0], "NaN or infinity"),
    ([1.0, float("inf"), 0.0], "NaN or infinity"),
    ([1.0, "2", 3.0], "not a flat list of numbers"),
    ([1.0, None, 3.0], "not a flat list of numbers"),
    ([[1.0], [2.0], [3.0]], "not a flat list of numbers"),
    ([[1.0, 2.0], 3.0, 4.0], "not a list of numbers|not a flat list"),
    ([True, False, True], "not a flat list of numbers"),
    ([1.0, 2 ** 80, 0.0], "not a list of numbers|not a flat list"),
    ([1.0] * (MAX_DIMENSION + 1), "more than"),
]


@pytest.mark.parametrize("vector,message", BAD_VECTORS, ids=[m for _, m in BAD_VECTORS])
def test_unusable_vectors_are_refused_with_a_message(vector, message):
    with pytest.raises(EmbeddingError, match=message):
        as_unit_vector(vector)


@pytest.mark.parametrize("vector,message", BAD_VECTORS, ids=[m for _, m in BAD_VECTORS])
async def test_an_unusable_request_embedding_raises_for_the_fallback(vector, message):
    index = await SemanticIndex.build(DESTINATIONS, Recorder())
    with pytest.raises(EmbeddingError):
        index.nearest(vector)


@pytest.mark.parametrize("vector,message", BAD_VECTORS[:-1], ids=[m for _, m in BAD_VECTORS[:-1]])
async def test_an_unusable_example_embedding_fails_the_build(vector, message):
    embed = Recorder(answer=lambda texts: [vector if t == "support two" else VECTORS[t] for t in texts])
    with pytest.raises(EmbeddingError, match=message):
        await SemanticIndex.build(DESTINATIONS, embed)


async def test_dimension_mismatches_are_refused():
    index = await SemanticIndex.build(DESTINATIONS, Recorder())
    with pytest.raises(DimensionMismatch, match="4 numbers where the index's have 3"):
        index.nearest([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(DimensionMismatch, match="2 numbers where the index's have 3"):
        index.nearest([1.0, 0.0])
    inconsistent = Recorder(answer=lambda texts: [[1.0, 0.0] if t == "chat one" else VECTORS[t] for t in texts])
    with pytest.raises(DimensionMismatch, match="example 5 has 2 numbers"):
        await SemanticIndex.build(DESTINATIONS, inconsistent)


@pytest.mark.parametrize("answer,got", [
    (lambda texts: [[1.0]] * (len(texts) - 1), "got 4"),
    (lambda texts: [[1.0]] * (len(texts) + 1), "got 6"),
    (lambda texts: None, "got NoneType"),
    (lambda texts: {"data": []}, "got dict"),
])
async def test_an_answer_without_one_vector_per_text_fails_the_build(answer, got):
    with pytest.raises(EmbeddingError, match=f"asked for 5 embeddings, {got}"):
        await SemanticIndex.build(DESTINATIONS, Recorder(answer=answer))


async def test_errors_of_embed_itself_pass_through():
    async def down(texts):
        raise ConnectionRefusedError("embedding route down")
    with pytest.raises(ConnectionRefusedError):
        await SemanticIndex.build(DESTINATIONS, down)


async def test_an_index_over_its_memory_bound_is_refused():
    dim = MAX_DIMENSION
    examples = MAX_INDEX_VALUES // dim + 1
    destinations = [WireDestination(model="a", examples=[f"e{i}" for i in range(examples)])]
    embed = Recorder(answer=lambda texts: [[1.0] * dim for _ in texts])
    with pytest.raises(EmbeddingError, match="numbers an index holds"):
        await SemanticIndex.build(destinations, embed)
    assert len(embed.calls) == 1   # refused at the first answer, before the rest is asked for


def test_unit_vectors_are_float32_and_normalised():
    v = as_unit_vector([3, 4])
    assert v.dtype == np.float32 and np.allclose(v, [0.6, 0.8])
    assert np.allclose(as_unit_vector([1e-320, 0.0]), [1.0, 0.0])   # tiny but not zero: still has a direction
    assert np.allclose(as_unit_vector([1e308, -1e308]), [math.sqrt(0.5), -math.sqrt(0.5)])   # no overflow
