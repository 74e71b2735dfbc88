"""A SentencePiece "precompiled charsmap" built from a per-code-point map, for ``tokenizers.normalizers.Precompiled``.

The format (SentencePiece ``normalizer.cc``, read by the ``spm_precompiled`` crate inside ``tokenizers``): a
little-endian uint32 byte length of a darts-clone double-array trie, the trie's 32-bit units, then the replacement
strings, each NUL-terminated. The trie maps the UTF-8 bytes of an input string to the offset of its replacement.

A unit of the double array: bits 0-7 the label (the byte that leads to the node), bit 8 "has a leaf", bits 10-31 the
offset to the node's children block (XOR addressing: child ``c`` of a node at ``p`` with offset ``o`` is at
``p ^ o ^ c``); a leaf unit (the value, at label 0) has bit 31 set and the value in bits 0-30.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

_LEAF = 1 << 31
_HAS_LEAF = 1 << 8
_MAX_OFFSET = 1 << 21  # offsets below this are stored as they are (bit 9 clear)


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: int | None = None


def precompiled_charsmap(mapping: Mapping[str, str]) -> bytes:
    """The charsmap that replaces each key of ``mapping`` by its value (an empty value deletes the key).

    Keys must be non-empty and free of NUL; none may be a prefix of another (single code points never are, as
    UTF-8 is prefix-free), since the normaliser takes the shortest key that matches.
    """
    blob = bytearray()
    offsets: dict[str, int] = {}
    root = _Node()
    for key, value in sorted(mapping.items()):
        data = key.encode("utf-8")
        if not data or b"\0" in data or "\0" in value:
            raise ValueError(f"charsmap keys must be non-empty and values free of NUL, got {key!r} -> {value!r}")
        if value not in offsets:
            offsets[value] = len(blob)
            blob += value.encode("utf-8") + b"\0"
        node = root
        for byte in data:
            if node.value is not None:
                raise ValueError(f"charsmap key {key!r} has a shorter key as its prefix")
            node = node.children.setdefault(byte, _Node())
        if node.children or node.value is not None:
            raise ValueError(f"charsmap key {key!r} is a prefix of another key or repeated")
        node.value = offsets[value]
    units = _double_array(root)
    trie = units.astype("<u4").tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def _double_array(root: _Node) -> np.ndarray:
    """Place the trie's nodes in a double array: each node gets its own base, its children's slots free there."""
    size = 1 << 16
    units = np.zeros(size, dtype=np.int64)
    used = np.zeros(size, dtype=bool)  # slot taken
    is_base = np.zeros(size, dtype=bool)  # base given to a node
    used[:256] = True  # the first block holds the root alone
    pending: list[tuple[_Node, int]] = [(root, 0)]
    start = 256  # no free slot below this
    while pending:
        node, pos = pending.pop()
        labels = np.array(sorted(node.children) + ([0] if node.value is not None else []), dtype=np.int64)
        probe, window = start, 4096
        while True:
            while probe + window + 256 > size:  # room for a window of candidate bases and their blocks
                units, used, is_base = (np.concatenate([a, np.zeros_like(a)]) for a in (units, used, is_base))
                size *= 2
            candidates = np.arange(probe, probe + window, dtype=np.int64)
            free = ~is_base[candidates] & ~used[candidates[:, None] ^ labels[None, :]].any(axis=1)
            if free.any():
                base = int(candidates[int(np.argmax(free))])
                break
            probe += window
        is_base[base] = True
        offset = pos ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("charsmap too large for a double array with 21-bit offsets")
        units[pos] |= offset << 10 | (_HAS_LEAF if node.value is not None else 0)
        if node.value is not None:
            units[base] = _LEAF | node.value
            used[base] = True
        for label, child in node.children.items():
            units[base ^ label] = label
            used[base ^ label] = True
            pending.append((child, base ^ label))
        while start < size and used[start]:
            start += 1
    end = (int(np.flatnonzero(used).max()) // 256 + 1) * 256  # whole blocks: a lookup XORs within its block
    return units[:end].astype(np.uint32)
