"""The real bundled all-MiniLM-L6-v2 (offline): semantics, shape, batching, and STS-B Spearman.

Run only these with ``-m minilm``; skip them with ``-m "not minilm"``. The STS-B test skips without the data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.types import Pooling

pytestmark = pytest.mark.minilm

STS_DIR = Path(__file__).parents[2] / "shared" / "data" / "stsbenchmark"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Noise cancelling wireless headphones with a 30-hour battery",
    "stainless steel chef's knife, 8-inch",
    "x",
]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    # exact (float32): these tests check the encoder loop and compare with sentence-transformers at 1e-5
    return Encoder.from_pretrained(EncoderConfig(preset="exact"))


def test_defaults_come_from_the_checkpoint(minilm: Encoder) -> None:
    assert minilm.dim == 384
    assert minilm.pooling is Pooling.MEAN
    assert minilm.max_length == 256
    assert minilm.source == "default"


def test_vectors_have_dimension_384_and_unit_norm(minilm: Encoder) -> None:
    vectors = minilm.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_eating_food_is_closer_to_eating_bread_than_to_riding_a_horse(minilm: Encoder) -> None:
    food, bread, horse = minilm.encode(SENTENCES[:3])
    sim_bread, sim_horse = float(food @ bread), float(food @ horse)
    assert sim_bread > sim_horse + 0.2
    assert sim_bread > 0.6


@pytest.fixture(scope="module")
def one_at_a_time(minilm: Encoder) -> np.ndarray:
    """Each sentence encoded alone (batch size 1, so no padding at all)."""
    return np.stack([minilm.encode([s], batch_size=1)[0] for s in SENTENCES])


@pytest.mark.parametrize("batch_size", [2, 64], ids=lambda b: f"batch-{b}")
def test_results_do_not_depend_on_batch_size(minilm: Encoder, one_at_a_time: np.ndarray, batch_size: int) -> None:
    np.testing.assert_allclose(minilm.encode(SENTENCES, batch_size=batch_size), one_at_a_time, atol=1e-5, rtol=0)


def test_results_do_not_depend_on_input_order(minilm: Encoder, one_at_a_time: np.ndarray) -> None:
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    shuffled = minilm.encode([SENTENCES[i] for i in perm], batch_size=4)
    np.testing.assert_allclose(shuffled, one_at_a_time[perm], atol=1e-5, rtol=0)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""

    def ranks(a: np.ndarray) -> np.ndarray:
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a), dtype=np.float64)
        r[order] = np.arange(1, len(a) + 1)
        for value in np.unique(a):  # average the ranks of tied values
            tied = a == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_a_query_is_bit_identical_alone_and_in_any_batch() -> None:
    """The default preset (bfloat16 where the CPU runs it natively, else float32), 1 and 2 threads: queries of 3 to
    ~100 tokens encode to the same bits alone and in batches of 2, 5 and 32 (encoder.QUERY_PAD_MULTIPLE)."""
    encoder = Encoder.from_pretrained()
    queries = [*SENTENCES, *(f"running shoes size {i} for men" for i in range(24))]
    queries += ["a much longer query about " + " ".join(f"word{j}" for j in range(n)) for n in range(0, 40, 4)]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            alone = encoder.encode_queries(queries, batch_size=1)
            for batch_size in (2, 5, 32):
                np.testing.assert_array_equal(encoder.encode_queries(queries, batch_size=batch_size), alone)
    finally:
        torch.set_num_threads(before)


def test_spearman_helper() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # With ties: ranks x = [1.5, 1.5, 3], y = [1, 2, 3] -> Pearson = sqrt(3)/2.
    assert spearman(np.array([5, 5, 7]), np.array([1, 2, 3])) == pytest.approx(np.sqrt(3) / 2)


@pytest.mark.data
def test_sts_benchmark_spearman(minilm: Encoder) -> None:
    path = STS_DIR / "sts-test.csv"
    if not path.is_file():
        pytest.skip(f"STS benchmark data not found at {STS_DIR}")
    scores, first, second = [], [], []
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            fields = row[:7]
            scores.append(float(fields[4]))
            first.append(fields[5])
            second.append(fields[6])
            if len(scores) == 300:
                break
    assert len(scores) == 300
    a, b = minilm.encode(first), minilm.encode(second)
    cosine = (a * b).sum(axis=1)
    rho = spearman(cosine, np.array(scores))
    assert rho > 0.75, f"Spearman {rho:.4f}"
    print(f"STS-B test (first 300 pairs): cosine Spearman {rho:.4f}")
