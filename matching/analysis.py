"""Text analysis: how titles and queries become terms (the analysers a bundle records in its manifest)."""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata
from collections.abc import Iterable
from enum import StrEnum
from itertools import islice
from typing import Any

import Stemmer

from matching.errors import ConfigError

# The case folding a lexical index was built with, recorded with it ("fold"; indexes from before the record are 1):
# 1 was NFKC + casefold, which left the dot above of a lowered Turkish İ ("i̇stanbul" missed "istanbul"); 2 is
# fold_case. An index keeps the folding it was built with, so its stored terms keep matching its queries.
FOLD = 2
FOLDS = (1, 2)
RESOLVE_SAMPLE = 100_000
_STEM_CACHE = 200_000
_CJK_SHARE = 0.1


class Analyzer(StrEnum):
    """How titles and queries become terms; recorded in the bundle manifest."""

    AUTO = "auto"  # resolved at build time by resolve_analyzer()
    STANDARD = "standard"  # fold_case, unicode word tokens, CJK runs as character uni- and bigrams
    ENGLISH = "english"  # STANDARD + English stopwords removed + Snowball English stemming
    CJK = "cjk"  # CJK runs as character uni- and bigrams, other runs as ENGLISH; what 'auto' picks for kana and Hangul
    # CJK runs cut into words by jieba (the optional extra matching[cjk]), other runs as ENGLISH. On LCQMC test the
    # untrained score reaches ROC-AUC 0.829 with it against 0.802 with character n-grams (0.803 with an early words +
    # characters cut, under the fusion of then: not CHINESE_MIXED's, whose characters are terms of their own).
    # What 'auto' chose for Chinese before CHINESE_MIXED; bundles built with it keep it.
    CHINESE = "chinese"
    # CJK runs as jieba's dictionary words (no HMM guesses at unknown words) and, as terms of their own, their single
    # characters; other runs as ENGLISH. What 'auto' picks for Chinese with jieba installed. The lexical share's
    # ROC-AUC on LCQMC dev / test: 0.7429 / 0.8475 with CHINESE, 0.7491 / 0.8504 without the HMM, 0.7526 / 0.8492
    # with its characters too, 0.7455 / 0.8143 with CJK (BENCHMARKS.md): the HMM cuts a name or a domain word
    # one way in one text and another way in the next, and the characters still match where the words do not.
    CHINESE_MIXED = "chinese-mixed"
    # CJK runs as single characters, other runs as ENGLISH: what 'auto' picks for Chinese without jieba. LCQMC test /
    # dev, lexical share 0.8397 / 0.7495 against 0.8143 / 0.7455 with CJK's bigrams too; the untrained default with
    # the English model 0.8416 / 0.7531 against 0.8151 / 0.7515, with multilingual-e5-small 0.9190 / 0.8883 against
    # 0.9167 / 0.8871 (CHINESE_MIXED: 0.8498 / 0.7565, 0.9194 / 0.8898): a bigram across two words is a rare term
    # that matches by chance, and a question's words recur as its characters. Its characters are what the fusion's
    # term counts count (an LCQMC text: 9 distinct at the median, against 5 words with CHINESE_MIXED, 17 with CJK),
    # so the length lift, chosen on words, lifts less than with jieba's words and more than with CJK.
    CHINESE_CHARS = "chinese-chars"


# NLTK's English list without contraction fragments, single letters other than "a", and words that tell
# products apart ("can", "no", "not", "nor", "off", "out", "over", "under", "up", "down").
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by did do does doing during each few for from further had has have having he her here hers
    herself him himself his how if in into is it its itself just me more most my myself now of on once only
    or other our ours ourselves own same she should so some such than that the their theirs them themselves
    then there these they this those through to too until very was we were what when where which while who
    whom why will with would you your yours yourself yourselves
    """.split()  # noqa: SIM905 - a word list reads better as text
)

# Han (with iteration marks), Hiragana, Katakana, Hangul (syllables and jamo), half-width Katakana.
_CJK = (
    "\u1100-\u11ff\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff"
    "\u3131-\u318e\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003134f"
)
_ASCII_WORD = re.compile(r"[a-z0-9]+")
_ASCII_LETTERS = re.compile(r"[A-Za-z]")
CJK_CHAR = re.compile(f"[{_CJK}]")  # one Han, kana or Hangul character
CHAR_TERM = "_"  # what CHINESE_MIXED puts before a character term
_LETTER = re.compile(r"[^\W\d_]")


_CJK_SPLIT = re.compile(f"([{_CJK}]+)")
# i and j carry their dot already: the U+0307 that lowering İ adds says nothing, and nobody types it
_DOT_ABOVE = re.compile("(?<=[ij])\u0307")
# Turkish and Azeri pair I with ı and İ with i; anywhere else ı is rare, so both fold to i and a Turkish title
# matches its query in either case ("KIRMIZI" ~ "kırmızı", "İSTANBUL" ~ "istanbul")
_DOTLESS_I = str.maketrans({"ı": "i"})
# kana and Hangul: a catalogue with many is Japanese or Korean, which jieba does not segment
_KANA_HANGUL = re.compile("[\u1100-\u11ff\u3041-\u3096\u30a1-\u30fa\u3131-\u318e\uac00-\ud7ff\uff66-\uff9f]")


@functools.cache
def _marks() -> str:
    """A character class body of the combining marks (BMP only: one fast character table)."""
    marks, start = [], -1
    for code in range(0x300, 0x10000):
        if unicodedata.category(chr(code))[0] == "M":
            if start < 0:
                start = code
        elif start >= 0:
            marks.append(f"{chr(start)}-{chr(code - 1)}")
            start = -1
    return "".join(marks)


@functools.cache
def _word_pattern() -> re.Pattern[str]:
    """Unicode words; combining marks stay inside a word, which Devanagari, Arabic and Hebrew words would
    otherwise break at every vowel sign (``\\w`` has no marks)."""
    return re.compile(f"[^\\W_]+(?:[{_marks()}]+[^\\W_]*)*")


class _StemState(threading.local):
    """PyStemmer objects are not thread-safe: one stemmer and one stem cache per thread."""

    def __init__(self) -> None:
        self.stemmer = Stemmer.Stemmer("english")
        self.cache: dict[str, str] = {}


_STEM = _StemState()


def _stem(words: list[str]) -> list[str]:
    cache = _STEM.cache
    try:
        return [cache[w] for w in words]
    except KeyError:
        pass
    missing = [w for w in words if w not in cache]
    if len(cache) + len(missing) > _STEM_CACHE:
        cache.clear()
    cache.update(zip(missing, _STEM.stemmer.stemWords(missing), strict=True))
    return [cache[w] for w in words]


def _words(words: list[str], english: bool) -> list[str]:
    if not english:
        return words
    return _stem([w for w in words if w not in ENGLISH_STOPWORDS])


def _grams(run: str, out: list[str]) -> None:
    """Character unigrams and bigrams of one CJK run, by position (a bigram never equals a unigram)."""
    for i in range(len(run) - 1):
        out.append(run[i])
        out.append(run[i : i + 2])
    out.append(run[-1])


def _chars(run: str, out: list[str]) -> None:
    """Each character of one CJK run, by position."""
    out.extend(run)


def jieba_available() -> bool:
    try:
        import jieba  # noqa: F401
    except ImportError:
        return False
    return True


_NEEDS_JIEBA = "this analyser ('chinese' or 'chinese-mixed') needs jieba: pip install 'matching[cjk]' (or jieba)"


@functools.cache
def _jieba() -> Any:
    try:
        import jieba
    except ImportError:
        raise ConfigError(_NEEDS_JIEBA) from None
    jieba.setLogLevel(logging.WARNING)  # it announces its dictionary loading on stderr
    return jieba


def _segment(run: str, out: list[str]) -> None:
    out.extend(w for w in _jieba().lcut(run, HMM=True) if w.strip())


def _words_and_chars(run: str, out: list[str]) -> None:
    """jieba's dictionary words of one CJK run, then each character as a term of its own (``_`` + the character:
    no analysis makes a term with ``_``, so a one-character word and a character stay apart)."""
    out.extend(w for w in _jieba().lcut(run, HMM=False) if w.strip())
    out.extend(CHAR_TERM + char for char in run)


def fold_case(text: str) -> str:
    """``text`` in Unicode's caseless form: NFKC, casefold, NFKC again (casefold may leave a sequence that NFKC
    composes), then the dot above a lowered İ dropped and ı read as i (``'İstanbul'`` -> ``'istanbul'``,
    ``'Straße'`` -> ``'strasse'``, ``'ＡＢＣ'`` -> ``'abc'``)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _DOT_ABOVE.sub("", folded).translate(_DOTLESS_I)


def _folded(text: str, fold: int) -> str:
    if fold == 1:
        return unicodedata.normalize("NFKC", text).casefold()
    return fold_case(text)


def counted(terms: Iterable[str]) -> set[str]:
    """The distinct terms the term-count features count (the query's coverage, the length ratio and lift): the
    words, not CHINESE_MIXED's character terms, the only terms any analyser starts with ``_`` (counted, they would
    triple a Chinese text's count and move its length lift; LCQMC dev with multilingual-e5-small fell from 0.8901
    to 0.8874)."""
    return {term for term in terms if not term.startswith(CHAR_TERM)}


# how each analyser cuts a CJK run (the others: character uni- and bigrams), and those of them that need jieba
_CUTS = {Analyzer.CHINESE: _segment, Analyzer.CHINESE_MIXED: _words_and_chars, Analyzer.CHINESE_CHARS: _chars}
_JIEBA_CUTS = frozenset({Analyzer.CHINESE, Analyzer.CHINESE_MIXED})


def check_analyzer(analyzer: Analyzer) -> Analyzer:
    """``analyzer``, or :class:`ConfigError` now where it cuts words with jieba and jieba is not installed (a build
    would otherwise find out after encoding the whole catalogue)."""
    if analyzer in _JIEBA_CUTS and not jieba_available():
        raise ConfigError(_NEEDS_JIEBA)
    return analyzer


def analyze(text: str, analyzer: Analyzer, fold: int = FOLD) -> list[str]:
    """The terms of ``text``, in order, duplicates kept; ``fold`` is the case folding of the index they are for."""
    if analyzer == Analyzer.AUTO:
        raise ConfigError("analyzer 'auto' has to be resolved first: pass resolve_analyzer(titles)")
    english = analyzer != Analyzer.STANDARD
    if text.isascii():  # every folding lowers ASCII alike
        return _words(_ASCII_WORD.findall(text.lower()), english)
    out: list[str] = []
    cut = _CUTS.get(analyzer, _grams)
    # other text and CJK runs, alternating
    for i, piece in enumerate(_CJK_SPLIT.split(_folded(text, fold))):
        if i % 2:
            cut(piece, out)
        elif piece and (words := (_ASCII_WORD if piece.isascii() else _word_pattern()).findall(piece)):
            out += _words(words, english)
    return out


def resolve_analyzer(titles: Iterable[str]) -> Analyzer:
    """For (the first 100,000 of) ``titles``: where CJK characters are at least 10% of the letters and mostly Han,
    CHINESE_MIXED with jieba installed and CHINESE_CHARS without it; where they are not mostly Han (kana, Hangul),
    CJK (character n-grams); otherwise ENGLISH."""
    cjk = letters = kana = 0
    for title in islice(titles, RESOLVE_SAMPLE):
        if not isinstance(title, str):
            continue  # LexicalIndex.build reports it with its row
        if title.isascii():
            letters += len(_ASCII_LETTERS.findall(title))
        else:
            text = unicodedata.normalize("NFKC", title)
            cjk += len(CJK_CHAR.findall(text))
            kana += len(_KANA_HANGUL.findall(text))
            letters += len(_LETTER.findall(text))
    if not letters or cjk < _CJK_SHARE * letters:
        return Analyzer.ENGLISH
    if kana >= _CJK_SHARE * cjk:
        return Analyzer.CJK
    return Analyzer.CHINESE_MIXED if jieba_available() else Analyzer.CHINESE_CHARS


@functools.cache
def _title_piece() -> re.Pattern[str]:
    """A CJK run, or a word as :func:`_word_pattern` finds it (marks inside), in an unfolded title."""
    return re.compile(f"[{_CJK}]+|[^\\W_{_CJK}]+(?:[{_marks()}]+[^\\W_{_CJK}]*)*")


def matched_spans(query: str, title: str, analyzer: Analyzer, fold: int = FOLD) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of ``title`` whose terms are among the query's (for highlighting).

    Words are analysed one at a time, so a stemmed or case-folded form still matches; in a CJK run each
    character matches when the query has it (a jieba word or a bigram is made of such characters).
    """
    if analyzer == Analyzer.AUTO:
        analyzer = Analyzer.ENGLISH
    terms = set(analyze(query, analyzer, fold))
    query_chars = set(_folded(query, fold))
    spans: list[tuple[int, int]] = []
    for m in _title_piece().finditer(title):
        piece = m.group()
        if CJK_CHAR.match(piece):
            for i, char in enumerate(piece):
                if _folded(char, fold) in query_chars:
                    spans.append((m.start() + i, m.start() + i + 1))
        elif terms.intersection(analyze(piece, analyzer, fold)):
            spans.append(m.span())
    # neighbouring characters join into one span
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
