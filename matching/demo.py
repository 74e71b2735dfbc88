"""A generated product catalogue and the end-to-end demo the README's first command runs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd

# category -> (product nouns, attribute phrases, price range)
_CATALOGUE: dict[str, tuple[list[str], list[str], tuple[float, float]]] = {
    "audio": (
        [
            "over-ear headphones",
            "wireless earbuds",
            "bluetooth speaker",
            "soundbar",
            "studio monitor headphones",
            "portable radio",
            "on-ear headphones",
            "turntable",
        ],
        [
            "with active noise cancellation",
            "with 30-hour battery",
            "waterproof",
            "with deep bass",
            "foldable",
            "with built-in microphone",
            "hi-res audio",
            "with charging case",
        ],
        (15, 400),
    ),
    "computers": (
        [
            "gaming laptop",
            "ultrabook",
            "mechanical keyboard",
            "wireless mouse",
            "27-inch monitor",
            "usb-c hub",
            "external ssd",
            "webcam",
        ],
        [
            "with rgb backlight",
            "16gb ram",
            "1tb storage",
            "4k resolution",
            "ergonomic design",
            "with rtx graphics",
            "thunderbolt 4",
            "1080p full hd",
        ],
        (20, 2500),
    ),
    "kitchen": (
        [
            "chef's knife",
            "non-stick frying pan",
            "espresso machine",
            "blender",
            "cast iron skillet",
            "kettle",
            "air fryer",
            "cutting board",
        ],
        [
            "stainless steel",
            "8-inch",
            "dishwasher safe",
            "with temperature control",
            "1.7 litre",
            "bamboo",
            "professional grade",
            "with glass lid",
        ],
        (10, 600),
    ),
    "clothing": (
        [
            "cotton t-shirt",
            "running shoes",
            "rain jacket",
            "wool sweater",
            "denim jeans",
            "hiking boots",
            "yoga leggings",
            "baseball cap",
        ],
        [
            "for men",
            "for women",
            "slim fit",
            "breathable",
            "water-resistant",
            "organic cotton",
            "lightweight",
            "with reflective details",
        ],
        (8, 250),
    ),
    "outdoor": (
        [
            "camping tent",
            "sleeping bag",
            "insulated water bottle",
            "trekking poles",
            "headlamp",
            "backpack",
            "camping stove",
            "hammock",
        ],
        [
            "2-person",
            "ultralight",
            "for winter",
            "stainless steel",
            "rechargeable",
            "40 litre",
            "waterproof",
            "compact",
        ],
        (10, 500),
    ),
    "grocery": (
        [
            "green tea",
            "ground coffee",
            "dark chocolate bar",
            "olive oil",
            "almond butter",
            "rolled oats",
            "honey",
            "sparkling water",
        ],
        [
            "organic",
            "fair trade",
            "12-pack",
            "extra virgin",
            "gluten free",
            "no added sugar",
            "single origin",
            "1 kg",
        ],
        (2, 40),
    ),
}
_BRANDS = [
    "Acme",
    "Northwind",
    "Contoso",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Hooli",
    "Vandelay",
]
DEMO_QUERIES = [
    "wireless noise cancelling headphones",
    "laptop for gaming",
    "pan that food does not stick to",
    "waterproof jacket for hiking in the rain",
    "organic tea",
]


def generate_catalogue(size: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A reproducible catalogue of ``size`` distinct product titles with brand, category and price."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    categories = sorted(_CATALOGUE)
    while len(rows) < size:
        category = rng.choice(categories)
        nouns, attributes, (low, high) = _CATALOGUE[category]
        brand = rng.choice(_BRANDS)
        attrs = rng.sample(attributes, k=rng.choice([1, 1, 2]))
        title = f"{brand} {nouns[rng.randrange(len(nouns))]} {' '.join(attrs)}"
        if title in seen:
            if len(seen) >= _max_distinct():
                raise ValueError(f"the generator can make at most about {_max_distinct()} distinct titles")
            continue
        seen.add(title)
        rows.append(
            {
                "id": f"SKU-{len(rows) + 1:05d}",
                "title": title,
                "brand": brand,
                "category": category,
                "price": round(rng.uniform(low, high), 2),
            }
        )
    return pd.DataFrame(rows)


_COLOURS = ["black", "white", "grey", "silver", "red", "blue", "navy", "green", "olive", "beige", "brown", "pink"]
_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "qui", "dax", "nor", "bel", "fin", "zo", "tra"]


def generate_large_catalogue(size: int, seed: int = 0) -> pd.DataFrame:
    """Up to millions of product titles for scale tests: the demo vocabulary plus more brands, colours
    and model codes. Titles may repeat (as in real catalogues); ids are unique."""
    rng = np.random.default_rng(seed)
    brands = _BRANDS + [(a + b).capitalize() for a in _SYLLABLES for b in _SYLLABLES if a != b]
    categories = sorted(_CATALOGUE)
    cat = rng.integers(0, len(categories), size)
    brand = rng.integers(0, len(brands), size)
    noun = rng.integers(0, 8, size)
    attr1, attr2 = rng.integers(0, 8, size), rng.integers(0, 8, size)
    two = rng.random(size) < 0.4
    colour = rng.integers(-len(_COLOURS), len(_COLOURS), size)  # negative: no colour
    code = rng.integers(-900, 900, size)  # negative: no model code
    price = rng.random(size)
    titles, cats, prices = [], [], []
    for i in range(size):
        category = categories[cat[i]]
        nouns, attributes, (low, high) = _CATALOGUE[category]
        parts = [brands[brand[i]]]
        if colour[i] >= 0:
            parts.append(_COLOURS[colour[i]])
        parts += [nouns[noun[i]], attributes[attr1[i]]]
        if two[i] and attr2[i] != attr1[i]:
            parts.append(attributes[attr2[i]])
        if code[i] >= 0:
            parts.append(f"{chr(65 + code[i] % 26)}{100 + code[i]}")
        titles.append(" ".join(parts))
        cats.append(category)
        prices.append(round(low + (high - low) * float(price[i]), 2))
    return pd.DataFrame(
        {
            "id": [f"P{i:07d}" for i in range(1, size + 1)],
            "title": titles,
            "brand": [brands[b] for b in brand],
            "category": cats,
            "price": prices,
        }
    )


def generate_queries(size: int, seed: int = 1) -> list[str]:
    """Short shopper-style queries over the generated vocabulary (for latency and recall runs)."""
    rng = np.random.default_rng(seed)
    categories = sorted(_CATALOGUE)
    out = []
    for _ in range(size):
        nouns, attributes, _ = _CATALOGUE[categories[rng.integers(len(categories))]]
        words = [nouns[rng.integers(8)], attributes[rng.integers(8)]]
        if rng.random() < 0.5:
            words.insert(0, _COLOURS[rng.integers(len(_COLOURS))])
        if rng.random() < 0.3:
            words.insert(0, _BRANDS[rng.integers(len(_BRANDS))])
        out.append(" ".join(words))
    return out


def _max_distinct() -> int:
    total = 0
    for nouns, attributes, _ in _CATALOGUE.values():
        a = len(attributes)
        total += len(nouns) * (a + a * (a - 1))
    return total * len(_BRANDS)


def _generated(path: Path) -> bool:
    """Whether ``path`` is a catalogue the demo wrote (its header, and SKU ids)."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        head = [fh.readline() for _ in range(2)]
    return head[0].strip() == "id,title,brand,category,price" and head[1].startswith("SKU-")


def run_demo(out: Path, *, size: int = 3000, show_progress: bool = True) -> None:
    """Write a generated catalogue CSV, build a bundle from it, and print matches for a few queries."""
    from matching.bundle import current_generation, is_bundle, read_manifest
    from matching.errors import BundleError
    from matching.matcher import Matcher

    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.parent / f"{out.name}-catalogue.csv"
    text = generate_catalogue(size).to_csv(index=False)
    # the demo replaces only what an earlier demo wrote: its own catalogue file and a bundle built from it
    if csv_path.exists() and (not csv_path.is_file() or not _generated(csv_path)):
        raise BundleError(f"{str(csv_path)!r} exists and is not a demo catalogue; choose another --out")
    if is_bundle(out) and read_manifest(current_generation(out), verify=False).source.get("name") != str(csv_path):
        raise BundleError(f"{str(out)!r} is a bundle that the demo did not build; choose another --out")
    csv_path.write_text(text, encoding="utf-8")
    print(f"wrote {size} generated product titles to {csv_path}")
    matcher = Matcher.build(csv_path, out, overwrite=True, show_progress=show_progress)
    print(f"built bundle {out} ({len(matcher)} titles, index {matcher.manifest.factory})")
    with matcher:
        for query, hits in zip(DEMO_QUERIES, matcher.search_batch(DEMO_QUERIES, k=5), strict=True):
            print(f"\nquery: {query}")
            for rank, hit in enumerate(hits, 1):
                meta = hit.metadata
                print(f"  {rank}. {hit.score:.3f}  {hit.title}  ({meta['category']}, ${meta['price']})")
    print(f'\nsearch it yourself: matching search {out} "your query" -k 10')
