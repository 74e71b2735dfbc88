"""Shared fixtures: a tiny random BERT built in code, a small product catalogue and a bundle built from it.

Nothing here downloads anything: the tiny checkpoint is written with ``save_pretrained`` into a temporary
directory once per session, so every test that needs an encoder runs in milliseconds.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

# -- the tiny checkpoint -----------------------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

BRANDS = ["Acme", "Northwind", "Contoso", "Globex", "Initech"]
PRODUCTS = [
    "wireless headphones",
    "running shoes",
    "coffee maker",
    "leather wallet",
    "gaming laptop",
    "yoga mat",
    "desk lamp",
    "water bottle",
]
COLOURS = ["black", "white", "red", "blue", "green", "silver", "grey"]

_COMMON_WORDS_TEXT = """
the a an of and or for with without in on at to from by is are was were be been it this that these those
man woman child people person eating eats food piece bread riding rides horse car bike dog cat playing plays
guitar music song sings singing walking runs running street park house home water river sea beach sun sky
day night morning evening old new big small large little good bad best better fast slow hot cold warm cool
one two three four five six seven eight nine ten hundred thousand first second last next
black white red blue green yellow orange purple pink brown silver grey gold
wireless wired bluetooth noise cancelling headphones earbuds speaker speakers radio sound audio bass
running shoes shoe boots sneakers sandals jacket coat shirt t-shirt jeans sweater cap hat socks dress
coffee maker tea kettle espresso machine blender toaster pan pot knife cutting board kitchen cup mug
leather wallet bag backpack belt watch phone case charger cable usb laptop gaming keyboard mouse monitor
screen desk lamp light chair table bed sofa pillow blanket yoga mat water bottle tent sleeping camping
stainless steel plastic wood wooden glass cotton wool organic waterproof portable compact lightweight heavy
pro max mini plus ultra premium classic sport sports travel outdoor indoor office men women kids pack set
price cheap expensive sale brand quality fit size inch litre kg battery hour hours life power energy
acme northwind contoso globex initech umbrella stark wayne hooli vandelay
query title text search find match matching product products catalogue item items store shop buy
"""
COMMON_WORDS = _COMMON_WORDS_TEXT.split()


def tiny_vocab(extra: Sequence[str] = ()) -> list[str]:
    """Special tokens, punctuation, words, and single characters (plain and ``##``) so any text tokenizes, then
    ``extra`` (e.g. CJK characters, each a token of its own to BERT's tokenizer)."""
    chars = list(string.ascii_lowercase) + list(string.digits)
    words = list(dict.fromkeys(w for w in COMMON_WORDS if w not in chars))
    vocab = [
        *SPECIAL_TOKENS,
        *string.punctuation,
        *chars,
        *(f"##{c}" for c in chars),
        *(f"##{p}" for p in string.punctuation),
        *words,
        *extra,
    ]
    assert len(vocab) == len(set(vocab))
    return vocab


def make_tiny_bert(directory: Path, *, seed: int = 0, extra: Sequence[str] = ()) -> Path:
    """Write a 2-layer, 32-dim random BERT and a WordPiece tokenizer into ``directory`` (``extra``: more tokens)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab(extra)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))
    if len(tokenizer.get_vocab()) != len(vocab):
        # transformers 5 ignores vocab_file= and builds a specials-only vocabulary; pass the words directly.
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert len(tokenizer.get_vocab()) == len(vocab)
    assert tokenizer.pad_token_id == 0
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and vocabulary with different random weights."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-seed1"), seed=1)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_dir: Path) -> Any:
    from matching.config import EncoderConfig
    from matching.encoder import Encoder

    # exact (float32): tests compare against hand computations and sentence-transformers at 1e-5
    return Encoder.from_pretrained(EncoderConfig(model=str(tiny_model_dir), preset="exact"))


# -- the catalogue -------------------------------------------------------------------------------------


def make_catalogue() -> pd.DataFrame:
    """40 distinct product titles with arbitrary (non-contiguous) integer ids, a brand and a price."""
    rows = []
    i = 0
    for b, brand in enumerate(BRANDS):
        for p, product in enumerate(PRODUCTS):
            colour = COLOURS[(b + 2 * p) % len(COLOURS)]
            rows.append(
                {
                    "id": 1000 + 7 * i,
                    "title": f"{brand} {colour} {product}",
                    "brand": brand,
                    "price": round(4.99 + 3.25 * i, 2),
                }
            )
            i += 1
    df = pd.DataFrame(rows)
    assert df["title"].str.lower().is_unique
    return df


@pytest.fixture
def catalogue_df() -> pd.DataFrame:
    """A fresh copy per test, so a test may modify it."""
    return make_catalogue()


@pytest.fixture(scope="session")
def built_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Any:
    """A Matcher built once from :func:`make_catalogue` (Flat index, untrained scorer). Do not modify it."""
    matcher = build_products(tmp_path_factory.mktemp("bundles") / "products", tiny_encoder)
    yield matcher
    matcher.close()


# -- helpers ------------------------------------------------------------------------------------------


def hidden_entries(directory: Path) -> list[str]:
    """Names starting with a dot (staging/building leftovers) directly inside ``directory``.

    A bundle's writer lock file (``.NAME.lock`` beside it) is not a leftover: it stays by design.
    """
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def assert_same_ranking(
    ids_a: Sequence[Any],
    scores_a: Sequence[float],
    ids_b: Sequence[Any],
    scores_b: Sequence[float],
    atol: float,
) -> None:
    """Two rankings agree: equal scores rank by rank, equal ids except where scores tie within ``atol``."""
    assert len(ids_a) == len(ids_b)
    np.testing.assert_allclose(np.asarray(scores_a), np.asarray(scores_b), atol=atol, rtol=0)
    for rank, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)):
        if a != b:
            assert abs(scores_a[rank] - scores_b[rank]) <= atol, f"rank {rank}: {a!r} != {b!r}"


# -- training helpers (added for test_train.py / test_pairs.py / test_tower.py) ------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """Run a module's torch work on one intra-op thread, then restore the previous setting.

    On a 2-core machine shared with other work, two torch threads contend so badly that a tiny MLP step
    takes ~100x longer; one thread keeps the training tests fast (results do not depend on it).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shifted_pairs(colours: Sequence[str], *, all_titles: bool = True) -> pd.DataFrame:
    """Synthetic (query, title, label) pairs where the right match is NOT the cosine-nearest title.

    The query "<colour> <product>" is relabelled to match every title of the product three places on in
    :data:`PRODUCTS`; titles of the query's own product (its cosine neighbours) are negatives. With
    ``all_titles`` every catalogue title is paired with each query, else only the positives and the
    query's own product's titles.
    """
    titles = make_catalogue()["title"].tolist()
    rows = []
    for colour in colours:
        for p, product in enumerate(PRODUCTS):
            target = PRODUCTS[(p + 3) % len(PRODUCTS)]
            for title in titles:
                if all_titles or title.endswith((target, product)):
                    rows.append({"query": f"{colour} {product}", "title": title, "label": int(title.endswith(target))})
    return pd.DataFrame(rows)


def build_products(path: Path, encoder: Any) -> Any:
    """A bundle of :func:`make_catalogue` at ``path``, built with ``encoder``."""
    from matching import Matcher

    # dense by default here: most suites compare with a brute-force cosine ranking (hybrid: tests/test_hybrid.py)
    return Matcher.build(make_catalogue(), path, encoder=encoder, show_progress=False, retrieval="dense")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Path:
    """The path of a product bundle with the default (hybrid) retrieval, one per test module: its tests may write to
    it (the service suites publish changes through it)."""
    from matching import Matcher

    path = tmp_path_factory.mktemp("module") / "products"
    Matcher.build(make_catalogue(), path, encoder=tiny_encoder, show_progress=False).close()
    return path


@pytest.fixture(scope="module")
def library(bundle: Path, tiny_encoder: Any) -> Any:
    """:func:`bundle` loaded, for the module's tests to compare a service's answers with the library's."""
    from matching import Matcher

    with Matcher.load(bundle, encoder=tiny_encoder) as m:
        yield m


@pytest.fixture
def own_bundle(tmp_path: Path, tiny_encoder: Any) -> Any:
    """A fresh, writable product bundle for one test."""
    matcher = build_products(tmp_path / "products", tiny_encoder)
    yield matcher
    matcher.close()


# -- CPU vs CUDA -------------------------------------------------------------------------------------


def on_cuda() -> bool:
    """Whether the tiny encoder runs on CUDA here (it picks CUDA where there is one)."""
    import torch

    return bool(torch.cuda.is_available())


def same_scores(a: Any, b: Any) -> bool:
    """Bit-identical on CPU; on CUDA, kernels chosen per batch shape may differ in the last float bits."""
    if on_cuda():
        return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5))
    return bool(np.array_equal(a, b))


def assert_same_file(a: Path, b: Path) -> None:
    """Byte-identical scored files on CPU; on CUDA the same rows with scores equal to 1e-5."""
    if not on_cuda():
        assert a.read_bytes() == b.read_bytes()
        return
    ta, tb = pd.read_csv(a, sep=None, engine="python"), pd.read_csv(b, sep=None, engine="python")
    pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=0, atol=1e-5)
