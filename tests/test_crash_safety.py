"""Crash safety: a writer killed (SIGKILL) at random moments never leaves a bundle that mixes two states.

A writer process (``tests/writer_process.py``) performs a deterministic sequence of steps (build, add, upsert,
remove, train_scorer, compact, rebuild, ...) whose catalogue after each step is known exactly. The test kills it
at random moments, then checks that the bundle loads (checksums verified), shows exactly the state after some
step - the one before the interrupted step or the one after it, never anything else - and that its store,
FAISS index and vectors agree row for row. The next writer resumes from the state found.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import writer_process as wp
from conftest import hidden_entries

from matching.bundle import collect_garbage
from matching.encoder import Encoder
from matching.errors import BundleError
from matching.layout import TRAIN_REPORT as TRAIN_REPORT_FILE
from matching.lexical import LexicalIndex
from matching.matcher import Matcher
from matching.store import read_config

KILLS = 30
STEPS_PER_WRITER = 8  # a writer runs at most this many steps before it is killed
SEED = 20240611
TIMEOUT = 120.0  # seconds to wait for any line from the writer: generous, the machine may be loaded
QUERIES = ["black headphones", "Acme coffee maker", "a yoga mat", "grey"]


class WriterServer:
    """The ``writer_process.py serve`` process: forks a writer per :meth:`run` and reports when it is reaped."""

    def __init__(self, model_dir: Path, bundle: Path, log: Path) -> None:
        self._stderr = log.open("w")
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        env["CUDA_VISIBLE_DEVICES"] = ""  # the server forks its writers, and CUDA does not survive a fork
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("writer_process.py")), "serve", str(model_dir), str(bundle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=root,
            env=env,
        )
        self.log = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.writer: int | None = None  # pid of the forked writer not yet reaped

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float = TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the writer said nothing for {timeout:g} s; {self.hung_writer()}stderr: {self.stderr_tail()}"
            ) from None
        if line is None:
            raise AssertionError(f"the writer server exited ({self.proc.poll()}); stderr: {self.stderr_tail()}")
        return line

    def hung_writer(self) -> str:
        """Where a silent writer waits: its kernel wait channel, and its threads' stacks into the log."""
        if self.writer is None:
            return ""
        try:
            wchan = Path(f"/proc/{self.writer}/wchan").read_text(errors="replace")
            os.kill(self.writer, signal.SIGUSR1)  # writer_process dumps every thread's stack to stderr
            time.sleep(2)
        except OSError as exc:
            return f"writer {self.writer}: {exc}; "
        return f"writer {self.writer} waits in {wchan!r}; "

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.log.read_text(errors="replace")[-3000:]

    def run(self, start: int, stop: int) -> int:
        """Fork a writer for steps ``start .. stop-1``; returns its pid once it is ready."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {start} {stop}\n")
        self.proc.stdin.flush()
        line = self.next_line()
        assert line.startswith("ready "), f"expected 'ready PID', got {line!r}"
        self.writer = int(line.split()[1])
        return self.writer

    def kill(self) -> list[str]:
        """SIGKILL the writer (which never exits by itself); returns what it said until it was reaped."""
        assert self.writer is not None
        os.kill(self.writer, signal.SIGKILL)
        said = []
        while not (line := self.next_line()).startswith(f"exit {self.writer} "):
            said.append(line)
        self.writer = None
        return said

    def close(self) -> None:
        try:
            if self.writer is not None and self.proc.poll() is None:
                os.kill(self.writer, signal.SIGKILL)
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._stderr.close()


def index_contents(matcher: Matcher) -> tuple[np.ndarray, np.ndarray]:
    """The ids FAISS holds and the vector it holds for each (the bundles here use a Flat index)."""
    index = matcher.index.index
    assert isinstance(index, faiss.IndexIDMap), type(index)
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
    return ids, vectors


def observe(bundle: Path, encoder: Encoder) -> wp.Signature | None:
    """Load the bundle (verifying checksums), check its parts agree row for row, and return its state.

    ``None``: there is no bundle (a first build that never finished).
    """
    if not bundle.exists():
        return None
    matcher = Matcher.load(bundle, encoder=encoder, verify=True)
    try:
        store = matcher.store
        rows = [r for batch in store.rows() for r in batch]
        live = np.asarray([r.row_id for r in rows], dtype=np.int64)
        assert len(rows) == store.count == matcher.index.ntotal == len(matcher) == matcher.manifest.count
        # FAISS holds exactly the live rows, each under its own vector
        ids, vectors = index_contents(matcher)
        assert sorted(ids.tolist()) == live.tolist()
        np.testing.assert_allclose(vectors, store.vectors[ids], atol=1e-6, rtol=0)
        # and each stored vector is its title's (a title and a stale vector would be a mix of two states)
        expected = encoder.encode_titles([r.title for r in rows])
        np.testing.assert_allclose(store.vectors[live], expected, atol=1e-4, rtol=0)
        # the BM25 index holds exactly the live titles, as a fresh build over them would
        lexical = matcher.snapshot.lexical
        assert lexical is not None
        fresh = LexicalIndex.build([(r.row_id, r.title) for r in rows], lexical.analyzer, rows=lexical.rows)
        assert lexical.equals(fresh)
        # a search deep enough to return everything returns every live title, each with its row
        every = {r.external_id for r in rows}
        for rerank in (True, False):
            for hits in matcher.search_batch(QUERIES, k=len(rows), candidates=len(rows), rerank=rerank):
                assert len(hits) == len(rows)
                assert {h.id for h in hits} == every
        config = read_config(bundle / str(matcher.generation))
        return wp.Signature(
            frozenset((r.external_id, r.title, json.dumps(r.metadata, sort_keys=True)) for r in rows),
            trained=TRAIN_REPORT_FILE in matcher.manifest.files,
            dead_rows=config["rows"] > config["count"],
        )
    finally:
        matcher.close()


def identify(found: wp.Signature | None, allowed: list[int], context: str) -> int:
    """The step whose state ``found`` is, which must be one of ``allowed`` (-1: no bundle)."""
    for k in allowed:
        expected = wp.signature(k) if k >= 0 else None
        if found == expected:
            return k
    lines = [f"{context}: the bundle is in none of the states after steps {allowed}"]
    if found is None:
        lines.append("  there is no bundle")
    for k in allowed:
        if k < 0 or found is None:
            continue
        expected = wp.signature(k)
        lines.append(
            f"  vs step {k} ({wp.op_name(k)}): missing {sorted(expected.catalogue - found.catalogue)[:4]}, "
            f"extra {sorted(found.catalogue - expected.catalogue)[:4]}, trained {found.trained} "
            f"(expected {expected.trained}), dead rows {found.dead_rows} (expected {expected.dead_rows})"
        )
    raise AssertionError("\n".join(lines))


def kind(step: int) -> str:
    return wp.op_name(step) if step > 0 else "first build"


def leftovers(bundle: Path) -> set[str]:
    """What crashed writers left: staging directories inside the bundle, half-built bundles beside it."""
    inside = {f"{bundle.name}/{n}" for n in hidden_entries(bundle)} if bundle.is_dir() else set()
    return inside | set(hidden_entries(bundle.parent))


def test_a_writer_killed_at_random_moments_never_leaves_a_mixed_state(
    tiny_model_dir: Path, tiny_encoder: Encoder, tmp_path: Path
) -> None:
    started = time.perf_counter()
    rng = random.Random(SEED)
    bundle = tmp_path / "bundles" / "catalogue"
    bundle.parent.mkdir()
    server = WriterServer(tiny_model_dir, bundle, tmp_path / "writer.log")
    state = -1  # the last step whose state the bundle was seen in (-1: no bundle yet)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()  # the step kind each mid-change kill interrupted
    seen: set[int] = set()
    cleaned = dirty = 0
    try:
        line = server.next_line()
        assert line.startswith("serving "), line
        assert line.split()[1] == tiny_encoder.fingerprint  # the writer encodes exactly as this process does
        for kill in range(KILLS):
            before = leftovers(bundle)
            start = state + 1
            server.run(start, start + STEPS_PER_WRITER)
            # when to kill: right away (while the first step starts), shortly after some step begins
            # (mid-change: encoding, writing, publishing), or at any moment of the run
            mode = rng.choices(["early", "step", "any"], weights=[2, 6, 2])[0]
            if start == 0 and kill < 3:
                mode = "first build"
            said = []
            if mode == "first build":  # while the bundle is first built
                said.append(server.next_line())
                assert said[-1] == "begin 0", said
                time.sleep(rng.uniform(0, 0.06))
            elif mode == "early":
                time.sleep(rng.uniform(0, 0.03))
            elif mode == "step":
                # aim at the kind of step interrupted least so far, so every kind gets its share
                step = min(range(start, start + wp.CYCLE), key=lambda j: (kinds[kind(j)], rng.random()))
                target = f"begin {step}"
                while not said or said[-1] != target:
                    said.append(server.next_line())
                    assert not said[-1].startswith(("error", "idle")), f"writer: {said[-1]}"
                time.sleep(rng.uniform(0, 0.12))
            else:
                time.sleep(rng.uniform(0, 1.5))
            said += server.kill()
            errors = [x for x in said if x.startswith("error")]
            assert not errors, f"the writer failed before it was killed: {errors[0]}"
            began = [int(x.split()[1]) for x in said if x.startswith("begin ")]
            ended = [int(x.split()[1]) for x in said if x.startswith("end ")]
            last_begun = max(began, default=start - 1)
            last_ended = max(ended, default=start - 1)
            if last_begun > last_ended:
                allowed = [last_begun - 1, last_begun]  # killed during step last_begun: before or after it
            else:
                allowed = [last_ended]  # killed between steps: the last one is published
            dirty += bool(leftovers(bundle) - before)
            found = observe(bundle, tiny_encoder)
            k = identify(found, allowed, f"kill {kill} ({mode}, steps {start}..)")
            if last_begun > last_ended:
                outcomes["mid-change, old state kept" if k < last_begun else "mid-change, new state published"] += 1
                kinds[kind(last_begun)] += 1
            else:
                outcomes["between changes"] += 1
            assert k >= state
            if ended and before:
                # a write that finished cleared what earlier crashed writers had left
                assert not (before & leftovers(bundle)), before & leftovers(bundle)
                cleaned += 1
            state = k
            seen.add(k)
    finally:
        server.close()
    assert state >= 0, "no write finished in all the runs"

    # the next successful write clears every leftover, and old generations nobody reads are deleted
    remaining = leftovers(bundle)
    matcher = Matcher.load(bundle, encoder=tiny_encoder)
    matcher = wp.apply(state + 1, matcher, tiny_encoder, bundle)
    matcher.close()
    assert identify(observe(bundle, tiny_encoder), [state + 1], "after the final write") == state + 1
    assert leftovers(bundle) == set()
    collect_garbage(bundle)  # (a rebuild cannot delete the generation its own writer still reads)
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith("gen-")) == [
        (bundle / "CURRENT").read_text().strip()
    ]

    mid = outcomes["mid-change, old state kept"] + outcomes["mid-change, new state published"]
    print(
        f"\ncrash test: {KILLS} kills, {mid} mid-change ({outcomes['mid-change, old state kept']} kept the old "
        f"state, {outcomes['mid-change, new state published']} the new), {outcomes['between changes']} between "
        f"changes; interrupted: {dict(sorted(kinds.items()))}; {len(seen)} distinct states seen (steps "
        f"0..{state}); {dirty} kills left staging/building directories, cleared by the next write (checked after "
        f"{cleaned} kills; {len(remaining)} left before the final write); "
        f"{time.perf_counter() - started:.1f} s"
    )
    assert mid >= 5, outcomes  # the kills did land inside changes


def test_the_writer_steps_produce_their_expected_states(tiny_encoder: Encoder, tmp_path: Path) -> None:
    """The model the crash test checks against: each step, run without a crash, gives its expected state,
    and the states of neighbouring steps are told apart."""
    bundle = tmp_path / "catalogue"
    matcher: Any = None
    for k in range(wp.CYCLE + 2):
        matcher = wp.apply(k, matcher, tiny_encoder, bundle)
        found = observe(bundle, tiny_encoder)
        assert identify(found, [k - 1, k], f"step {k}") == k
        with pytest.raises(AssertionError, match="none of the states"):
            identify(found, [k - 1], "a wrong state")
    matcher.close()
    assert len({wp.signature(k) for k in range(40)}) == 40


def test_no_bundle_is_told_apart(tmp_path: Path, tiny_encoder: Encoder) -> None:
    assert observe(tmp_path / "nothing", tiny_encoder) is None
    assert identify(None, [-1, 0], "no bundle") == -1
    with pytest.raises(BundleError):
        Matcher.load(tmp_path / "nothing", encoder=tiny_encoder)
