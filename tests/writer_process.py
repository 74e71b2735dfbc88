"""A deterministic bundle writer for the crash-safety test, and the catalogue states it produces.

Step ``k`` of the writer is a pure function of ``k``, so the test can compute the exact catalogue after
every step. Steps cycle through every kind of change (``k % 6``)::

    0  Matcher.build(..., overwrite=True)  a new 12-title catalogue (step 0 builds the bundle from nothing)
    1  add        4 new titles                               (kept as a delta: matching.delta)
    2  upsert     2 changed titles, 2 changed metadata, 1 new title    (delta)
    3  remove     3 titles                                   (folds the delta into new base files)
    4  train_scorer (1 epoch)              the catalogue is unchanged; the generation gains train_report.json
    5  compact                             the catalogue is unchanged; the dead rows are gone

Each state is told apart by its :class:`Signature`: the catalogue, whether a trained scorer is published, and
whether the vector file holds dead rows.

Run as a script, this is a "zygote" server: it imports torch & co. once, then for each ``run START STOP``
line on stdin forks a writer process that performs steps ``START .. STOP-1``. Each writer prints ``ready PID``
once it has loaded the bundle, ``begin K`` / ``end K`` around each step, then ``idle`` (or ``error ...``) and
waits to be killed; the server prints ``exit PID STATUS`` when it has reaped it. The test SIGKILLs writers at
random moments; a fork is a real, separate process, and forking skips the ~3 s interpreter start per kill.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

BRANDS = ["Acme", "Northwind", "Contoso", "Globex", "Initech", "Hooli"]
PRODUCTS = ["headphones", "running shoes", "coffee maker", "leather wallet", "desk lamp", "yoga mat", "water bottle"]
COLOURS = ["black", "white", "red", "blue", "green", "silver", "grey"]
CYCLE = 6
OPS = ("build", "add", "upsert", "remove", "train", "compact")

Row = tuple[str, str, str, str]  # id, title, brand, tag
State = dict[str, tuple[str, str]]  # id -> (title, canonical metadata JSON)


def op_name(k: int) -> str:
    return OPS[k % CYCLE]


def _title(k: int, i: int, salt: str = "") -> str:
    brand = BRANDS[(k + i) % len(BRANDS)]
    product = PRODUCTS[(3 * k + i) % len(PRODUCTS)]
    colour = COLOURS[(k + 2 * i) % len(COLOURS)]
    return f"{brand} {colour} {product} {salt}{k} {i}"


def meta(brand: str, tag: str) -> str:
    """Metadata as the test reads it back from the store: canonical JSON."""
    return json.dumps({"brand": brand, "tag": tag}, sort_keys=True)


def change_rows(k: int) -> list[Row]:
    """The rows a build (k % 6 == 0), add (1) or upsert (2) step passes to the matcher."""
    phase = k % CYCLE
    if phase == 0:
        return [(f"r{k}-{i}", _title(k, i), BRANDS[i % len(BRANDS)], f"built-{k}") for i in range(12)]
    if phase == 1:
        return [(f"a{k}-{i}", _title(k, i, "new "), BRANDS[(i + 1) % len(BRANDS)], f"added-{k}") for i in range(4)]
    if phase == 2:
        before = state(k - 1)
        ids = sorted(before)
        rows: list[Row] = []
        for i, ext in enumerate(ids[:2]):  # a new title (re-encoded; leaves a dead row)
            title, _ = before[ext]
            rows.append((ext, f"{title} edition {k}", BRANDS[i], f"retitled-{k}"))
        for i, ext in enumerate(ids[2:4]):  # the same title, new metadata only
            title, _ = before[ext]
            rows.append((ext, title, BRANDS[i + 2], f"retagged-{k}"))
        rows.append((f"u{k}-0", _title(k, 0, "upserted "), BRANDS[4], f"upserted-{k}"))
        return rows
    raise ValueError(f"step {k} ({op_name(k)}) takes no rows")


def removed_ids(k: int) -> list[str]:
    """The ids a remove step (k % 6 == 3) removes: three spread over the catalogue."""
    ids = sorted(state(k - 1))
    return [ids[1], ids[len(ids) // 2], ids[-1]]


def train_pairs(k: int) -> Any:
    """Tiny (query, title, label) pairs over the catalogue before a train step (k % 6 == 4)."""
    import pandas as pd

    titles = sorted(title for title, _ in state(k - 1).values())
    rows = []
    for i, title in enumerate(titles[:6]):
        query = " ".join(title.split()[:3]).lower()
        rows.append({"query": query, "title": title, "label": 1})
        for other in (titles[(i + 3) % len(titles)], titles[(i + 7) % len(titles)]):
            rows.append({"query": query, "title": other, "label": 0})
    return pd.DataFrame(rows)


@cache
def state(k: int) -> State:
    """The catalogue after step ``k`` (``k = -1``: no bundle yet)."""
    if k < 0:
        return {}
    phase = k % CYCLE
    if phase == 0:
        return {ext: (title, meta(brand, tag)) for ext, title, brand, tag in change_rows(k)}
    out = dict(state(k - 1))
    if phase in (1, 2):
        out.update({ext: (title, meta(brand, tag)) for ext, title, brand, tag in change_rows(k)})
    elif phase == 3:
        for ext in removed_ids(k):
            del out[ext]
    return out


@dataclass(frozen=True)
class Signature:
    """What identifies the bundle state after a step."""

    catalogue: frozenset[tuple[str, str, str]]
    trained: bool  # the generation holds a published training report
    dead_rows: bool  # the vector file holds rows of removed or replaced titles


def signature(k: int) -> Signature:
    phase = k % CYCLE
    catalogue = frozenset((ext, title, m) for ext, (title, m) in state(k).items())
    return Signature(catalogue, trained=phase in (4, 5), dead_rows=phase in (2, 3, 4))


def frame(rows: list[Row]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=["id", "title", "brand", "tag"])


def apply(k: int, matcher: Any, encoder: Any, bundle: Path) -> Any:
    """Perform step ``k``; returns the matcher to use next."""
    from matching import Matcher

    phase = k % CYCLE
    if phase == 0:
        built = Matcher.build(frame(change_rows(k)), bundle, encoder=encoder, overwrite=True, show_progress=False)
        if matcher is not None:
            matcher.close()
        return built
    if phase in (1, 2):
        change = matcher.add if phase == 1 else matcher.upsert
        change(frame(change_rows(k)), show_progress=False)
    elif phase == 3:
        matcher.remove(removed_ids(k))
    elif phase == 4:
        pairs = train_pairs(k)
        # require_win=False: this suite tests publishing a trained scorer, whether or not it beats the default
        matcher.train_scorer(pairs, pairs, epochs=1, batch_size=8, hidden=16, require_win=False, show_progress=False)
    else:
        matcher.compact(show_progress=False)
    return matcher


def load_encoder(model_dir: str) -> Any:
    """The tiny encoder, on one torch thread (a forked process must not inherit a thread pool)."""
    import torch

    from matching.config import EncoderConfig
    from matching.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder.from_pretrained(EncoderConfig(model=model_dir, device="cpu", preset="exact"))


def run_writer(encoder: Any, bundle: Path, start: int, stop: int) -> None:
    """Perform steps ``start .. stop-1`` on the bundle (loading it unless step ``start`` builds it)."""
    from matching import Matcher, delta

    # a small fold limit: each cycle's add and upsert go into the delta, and its remove folds the delta into new
    # base files, so the kills land in both kinds of write
    delta.FOLD_ROWS, delta.FOLD_SHARE = 5, 0.0
    matcher = None if start % CYCLE == 0 else Matcher.load(bundle, encoder=encoder, verify=False)
    say(f"ready {os.getpid()}")
    for k in range(start, stop):
        say(f"begin {k}")
        matcher = apply(k, matcher, encoder, bundle)
        say(f"end {k}")
    say("idle")


def wait_for_kill() -> None:
    """A forked writer does not exit by itself (the test kills it, so its pid cannot be reused before that);
    it gives up after two minutes, should the test have died."""
    time.sleep(120)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(model_dir: str, bundle: str) -> None:
    """Fork one writer per ``run START STOP`` line on stdin; print ``exit PID STATUS`` when it is reaped."""
    from tqdm import std

    import matching.training.scorer  # noqa: F401  (imported once here, so each fork starts warm)

    # tqdm's monitor thread (started by the first bar, a disabled one too) takes tqdm's lock every 10 s: a fork
    # taken while it holds the lock leaves the child waiting on it for ever at its first bar (seen: a writer stuck
    # in tqdm's lock in write_bundle for 120 s). The library makes no bar with progress off (matching.progress);
    # this keeps any other library's bar in the zygote from starting the thread, so none holds the lock at a fork.
    std.tqdm.monitor_interval = 0  # the base class: tqdm.auto's and every other bar class inherit it
    encoder = load_encoder(model_dir)
    encoder.encode_titles(["warm up"])
    # a writer that hangs is asked for its threads' stacks (to stderr, the test's log) before the test fails
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    say(f"serving {encoder.fingerprint}")
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "run":
            break
        start, stop = int(parts[1]), int(parts[2])
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                run_writer(encoder, Path(bundle), start, stop)
            except BaseException as exc:
                say(f"error {type(exc).__name__}: " + " | ".join(str(exc).splitlines()[:3]))
            try:
                wait_for_kill()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        # pandas imports pyarrow where it is installed, and pyarrow starts a jemalloc background thread: a fork
        # taken while that thread holds an allocator lock leaves the child waiting on it for ever (seen: a forked
        # writer stuck in futex_wait with its staging store open). The writer never needs pyarrow; hide it.
        sys.modules["pyarrow"] = None  # type: ignore[assignment]
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5:
        run_writer(load_encoder(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: writer_process.py serve MODEL_DIR BUNDLE | writer_process.py MODEL_DIR BUNDLE START STOP")
