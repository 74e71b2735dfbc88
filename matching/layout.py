"""Every file name of a bundle, in one place.

A bundle is a directory with ``CURRENT`` naming its live generation; each generation directory holds
the files below (each component saves and loads its own), and ``manifest.json``, written last.
"""

from __future__ import annotations

POINTER_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
STORE_DB = "store.sqlite"
STORE_DELTA = "delta.sqlite"  # the changes since the base files were written (matching.delta)
VECTORS_FILE = "vectors.f32"  # append-only, hard-linked from one generation to the next
STORE_CONFIG = "store.json"
FIELDS_CONFIG = "fields.json"  # the indexed metadata fields' names, kinds and text values
FIELDS_ARRAYS = "fields.safetensors"  # their columns over row ids, and the live rows
INDEX_FILE = "index.faiss"  # the FAISS vector backend's index
EXACT_INDEX_FILE = "index.exact.npz"  # the exact vector backend's ids and vectors
INDEX_CONFIG = "index.json"
LEXICAL_CONFIG = "lexical.json"
LEXICAL_ARRAYS = "lexical.safetensors"
SCORER_WEIGHTS = "scorer.safetensors"
SCORER_CONFIG = "scorer.json"
QUERY_ENCODER = "query_encoder.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"  # a fine-tuned title/query encoder: the base checkpoint's weights replaced
TRAIN_REPORT = "train_report.json"

# what a catalogue change (add, upsert, remove, compact) rewrites, with every vector backend's files
# (matching.vectors.index_files); every other file is carried across
CATALOGUE_FILES = frozenset(
    {
        STORE_DB,
        STORE_DELTA,
        VECTORS_FILE,
        STORE_CONFIG,
        FIELDS_CONFIG,
        FIELDS_ARRAYS,
        INDEX_FILE,
        INDEX_CONFIG,
        LEXICAL_CONFIG,
        LEXICAL_ARRAYS,
    }
)
