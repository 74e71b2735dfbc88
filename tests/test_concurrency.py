"""Concurrency: readers in threads and processes search while a writer changes the catalogue; writers serialise.

Every state the writer produces is known in advance, so a reader can check that one search deep enough to
return every title returns exactly the catalogue of a single published generation, never a mix of two.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import BRANDS, COLOURS, PRODUCTS

from matching.bundle import collect_garbage, current_generation, writer_lock
from matching.encoder import Encoder
from matching.errors import BundleLockedError
from matching.matcher import Matcher

THREAD_READERS = 4
PROCESS_READERS = 2
WRITER_STEPS = 24
COMPACT_AT = 12
REFRESH_EVERY = 3  # searches between a reader's refreshes
DEPTH = 200  # more than any catalogue here holds: one search returns every title
TIMEOUT = 180.0  # generous: the machine may be loaded

Catalogue = frozenset[tuple[str, str, str]]  # (id, title, tag)
Rows = list[tuple[str, str, str]]


def _title(k: int, i: int) -> str:
    brand = BRANDS[(k + i) % len(BRANDS)]
    return f"{brand} {COLOURS[(k + 2 * i) % len(COLOURS)]} {PRODUCTS[(3 * k + i) % len(PRODUCTS)]} {k}-{i}"


def frame(rows: Rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "title", "tag"])


def initial_rows() -> Rows:
    return [(f"b-{i}", _title(0, i), "base") for i in range(20)]


def plan(k: int, before: dict[str, tuple[str, str]]) -> tuple[str, Any]:
    """The writer's step ``k`` (1-based) given the catalogue before it: (operation, rows or ids)."""
    ids = sorted(before)
    if k == COMPACT_AT:
        return "compact", None
    if k % 3 == 1:
        return "add", [(f"n{k}-{i}", _title(k, i), f"added-{k}") for i in range(3)]
    if k % 3 == 2:
        retitled = (ids[0], f"{before[ids[0]][0]} v{k}", f"retitled-{k}")
        retagged = (ids[1], before[ids[1]][0], f"retagged-{k}")
        return "upsert", [retitled, retagged, (f"u{k}", _title(k, 9), f"upserted-{k}")]
    return "remove", [ids[len(ids) // 3], ids[-1]]


def expected_states() -> list[Catalogue]:
    """The catalogue after each writer step (index 0: the bundle as built)."""
    current = {ext: (title, tag) for ext, title, tag in initial_rows()}
    states = [current]
    for k in range(1, WRITER_STEPS + 1):
        op, arg = plan(k, current)
        current = dict(current)
        if op in ("add", "upsert"):
            current.update({ext: (title, tag) for ext, title, tag in arg})
        elif op == "remove":
            for ext in arg:
                del current[ext]
        states.append(current)
    return [frozenset((ext, title, tag) for ext, (title, tag) in s.items()) for s in states]


def write(matcher: Matcher, pause: float = 0.05) -> list[str]:
    """Perform the writer's steps; returns the generation each published."""
    published = []
    current = {r.external_id: (r.title, r.metadata["tag"]) for rows in matcher.store.rows() for r in rows}
    for k in range(1, WRITER_STEPS + 1):
        op, arg = plan(k, current)
        if op == "add":
            matcher.add(frame(arg), show_progress=False)
        elif op == "upsert":
            matcher.upsert(frame(arg), show_progress=False)
        elif op == "remove":
            matcher.remove(arg)
        else:
            matcher.compact(show_progress=False)
        current = {r.external_id: (r.title, r.metadata["tag"]) for rows in matcher.store.rows() for r in rows}
        published.append(str(matcher.generation))
        time.sleep(pause)  # let the readers see this generation
    return published


def in_new_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a fresh thread (so the store opens a new database connection there); re-raises its error."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    if "error" in out:
        raise out["error"]
    return out["value"]


def catalogue(matcher: Matcher, query: str = "headphones", rerank: bool = False) -> Catalogue:
    hits = matcher.search(query, k=DEPTH, candidates=DEPTH, rerank=rerank)
    got = frozenset((str(h.id), h.title, h.metadata["tag"]) for h in hits)
    assert len(got) == len(hits), "a title came back twice"
    return got


def read(name: str, bundle: Path, encoder: Encoder, states: list[Catalogue], ready: Any, stop: Any) -> dict[str, Any]:
    """Search in a loop until ``stop``, checking each result is exactly one known catalogue; never raises."""
    index = {}
    for step, state in enumerate(states):
        index.setdefault(state, []).append(step)
    result: dict[str, Any] = {"name": name, "searches": 0, "refreshes": 0, "seen": {}, "error": None}
    queries = ["black headphones", "Acme coffee maker", "a yoga mat", "grey running shoes"]
    last_gen = ""
    try:
        # a reader that never refreshes: its generation must stay readable (even by new connections)
        pinned = Matcher.load(bundle, encoder=encoder)
        pinned_catalogue = catalogue(pinned)
        with Matcher.load(bundle, encoder=encoder) as matcher:
            finishing = False
            while True:
                gen = str(matcher.generation)
                assert gen >= last_gen, f"went back from {last_gen} to {gen}"
                last_gen = gen
                query = queries[result["searches"] % len(queries)]
                got = catalogue(matcher, query, rerank=result["searches"] % 2 == 0)
                result["searches"] += 1
                assert got in index, f"{gen}: {len(got)} hits that are no generation's catalogue"
                steps = result["seen"].setdefault(gen, index[got])
                assert steps == index[got], f"{gen} showed two catalogues"
                ready.set()  # (after the first search, which sees the generation before the writer starts)
                if finishing:
                    break
                if stop.is_set():
                    finishing = True  # one more search after the writer finished, on the final generation
                    matcher.refresh()
                elif result["searches"] % REFRESH_EVERY == 0:
                    result["refreshes"] += matcher.refresh()
        assert in_new_thread(lambda: catalogue(pinned)) == pinned_catalogue
        result["pinned"] = pinned.generation
        pinned.close()
    except BaseException:
        result["error"] = traceback.format_exc()
        ready.set()
    return result


def process_reader(
    name: str, bundle: str, model_dir: str, states: list[Catalogue], ready: Any, stop: Any, out: Any
) -> None:
    """A reader in its own (spawned) process, with its own encoder."""
    try:
        import torch

        from matching.config import EncoderConfig

        torch.set_num_threads(1)
        encoder = Encoder.from_pretrained(EncoderConfig(model=model_dir, preset="exact"))
    except BaseException:
        ready.set()
        out.put({"name": name, "error": traceback.format_exc()})
        return
    out.put(read(name, Path(bundle), encoder, states, ready, stop))


def test_readers_in_threads_and_processes_see_whole_generations_while_a_writer_changes(
    tiny_model_dir: Path, tiny_encoder: Encoder, tmp_path: Path
) -> None:
    started = time.perf_counter()
    bundle = tmp_path / "catalogue"
    states = expected_states()
    assert len(set(states)) == WRITER_STEPS  # only the compact leaves the catalogue as it was
    Matcher.build(frame(initial_rows()), bundle, encoder=tiny_encoder, show_progress=False).close()
    initial = current_generation(bundle).name

    ctx = multiprocessing.get_context("spawn")
    stop_processes, out = ctx.Event(), ctx.Queue()
    stop_threads = threading.Event()
    results: list[dict[str, Any]] = []
    processes = []
    threads = []
    ready_events: list[Any] = []
    for i in range(PROCESS_READERS):
        ready = ctx.Event()
        args = (f"process-{i}", str(bundle), str(tiny_model_dir), states, ready, stop_processes, out)
        processes.append(ctx.Process(target=process_reader, args=args, daemon=True))
        ready_events.append(ready)
    for i in range(THREAD_READERS):
        ready = threading.Event()
        args = (f"thread-{i}", bundle, tiny_encoder, states, ready, stop_threads)
        threads.append(threading.Thread(target=lambda a=args: results.append(read(*a)), daemon=True))
        ready_events.append(ready)
    try:
        for worker in (*processes, *threads):
            worker.start()
        for ready in ready_events:
            assert ready.wait(TIMEOUT), "a reader did not start"
        writer = Matcher.load(bundle, encoder=tiny_encoder)
        writing = time.perf_counter()
        published = write(writer)
        writing = time.perf_counter() - writing
        writer.close()
    finally:
        stop_threads.set()
        stop_processes.set()
        for thread in threads:
            thread.join(TIMEOUT)
        for _ in processes:
            try:
                results.append(out.get(timeout=TIMEOUT))
            except queue.Empty:
                break
        for process in processes:
            process.join(TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join()

    assert len(results) == THREAD_READERS + PROCESS_READERS
    errors = [f"{r['name']}:\n{r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    # every generation showed one catalogue, to every reader, and it is the one the writer published there
    by_generation: dict[str, list[int]] = {}
    for r in results:
        for gen, steps in r["seen"].items():
            assert by_generation.setdefault(gen, steps) == steps, f"{gen} showed two catalogues"
    for step, gen in enumerate(published, start=1):
        if gen in by_generation:
            assert step in by_generation[gen], (gen, step, by_generation[gen])
    for r in results:
        assert len(r["seen"]) > 1, f"{r['name']} saw only {list(r['seen'])}"
        assert published[-1] in r["seen"], f"{r['name']} never saw the final generation"
        assert r["pinned"] == initial  # a reader that never refreshed kept the first generation readable
    with Matcher.load(bundle, encoder=tiny_encoder) as final:
        got = frozenset((r.external_id, r.title, r.metadata["tag"]) for rows in final.store.rows() for r in rows)
        assert got == states[-1]
    # nobody reads the old generations now: they all go
    collect_garbage(bundle)
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith("gen-")) == [published[-1]]
    searches = sum(r["searches"] for r in results)
    per_reader = ", ".join(f"{r['name']} {r['searches']}" for r in sorted(results, key=lambda r: r["name"]))
    print(
        f"\nconcurrency test: {THREAD_READERS} reader threads + {PROCESS_READERS} reader processes, 1 writer; "
        f"{len(published)} changes in {writing:.1f} s; {searches} searches "
        f"({per_reader}); "
        f"{sum(r['refreshes'] for r in results)} refreshes; generations seen per reader "
        f"{[len(r['seen']) for r in results]} of {len(published) + 1}; every reader also kept {initial} open "
        f"throughout; {time.perf_counter() - started:.1f} s in all"
    )


def blocking(
    encoder: Encoder, monkeypatch: pytest.MonkeyPatch, thread: Callable[[], Any]
) -> tuple[threading.Event, threading.Event]:
    """Make ``encoder.encode_titles`` block in ``thread()`` (others pass): returns the events (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    original = encoder.encode_titles

    def encode_titles(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is thread():
            entered.set()
            assert release.wait(TIMEOUT)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode_titles", encode_titles)
    return entered, release


def test_a_second_writer_gets_a_clear_error_or_waits(
    tiny_encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "catalogue"
    Matcher.build(frame(initial_rows()), bundle, encoder=tiny_encoder, show_progress=False).close()
    first_rows = [("first-0", "Acme red desk lamp one", "first")]
    second_rows = [("second-0", "Globex blue yoga mat two", "second")]
    outcome: dict[str, Any] = {}

    def first_writer() -> None:
        with Matcher.load(bundle, encoder=tiny_encoder) as m:
            outcome["first"] = m.add(frame(first_rows), show_progress=False)

    def second_writer() -> None:
        with Matcher.load(bundle, encoder=tiny_encoder, lock_timeout=TIMEOUT) as m:
            outcome["second"] = m.add(frame(second_rows), show_progress=False)

    first = threading.Thread(target=first_writer, daemon=True)
    entered, release = blocking(tiny_encoder, monkeypatch, lambda: first)
    first.start()
    assert entered.wait(TIMEOUT)  # the first writer is encoding its titles, holding the writer lock
    live = current_generation(bundle).name

    impatient = Matcher.load(bundle, encoder=tiny_encoder, lock_timeout=0)
    with pytest.raises(BundleLockedError, match=r"is being changed by another writer; waited 0 s") as info:
        impatient.add(frame(second_rows), show_progress=False)
    assert "lock_timeout" in str(info.value)
    assert impatient.generation == live
    assert len(impatient) == 20
    impatient.close()

    second = threading.Thread(target=second_writer, daemon=True)
    second.start()
    second.join(0.5)
    assert second.is_alive()
    assert "second" not in outcome
    assert current_generation(bundle).name == live
    release.set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert sorted(outcome) == ["first", "second"], outcome
    assert outcome["second"].count == 22  # the second change was made on top of the first
    with Matcher.load(bundle, encoder=tiny_encoder) as final:
        ids = {r.external_id for rows in final.store.rows() for r in rows}
    assert {"first-0", "second-0"} <= ids
    assert len(ids) == 22


def test_a_writer_waits_for_a_held_lock_then_succeeds(tiny_encoder: Encoder, tmp_path: Path) -> None:
    bundle = tmp_path / "catalogue"
    Matcher.build(frame(initial_rows()), bundle, encoder=tiny_encoder, show_progress=False).close()
    m = Matcher.load(bundle, encoder=tiny_encoder, lock_timeout=0)
    done: dict[str, Any] = {}
    with writer_lock(bundle):
        with pytest.raises(BundleLockedError, match="another writer"):
            m.remove(["b-0"])
        m.lock_timeout = TIMEOUT
        waiter = threading.Thread(target=lambda: done.setdefault("report", m.remove(["b-0"])), daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()
    waiter.join(TIMEOUT)
    assert done["report"].removed == 1
    assert len(m) == 19
    m.close()


def test_old_generations_are_kept_while_read_and_deleted_after(tiny_encoder: Encoder, tmp_path: Path) -> None:
    bundle = tmp_path / "catalogue"
    Matcher.build(frame(initial_rows()), bundle, encoder=tiny_encoder, show_progress=False).close()

    def generations() -> list[str]:
        return sorted(p.name for p in bundle.iterdir() if p.name.startswith("gen-"))

    reader = Matcher.load(bundle, encoder=tiny_encoder)
    held = reader.generation
    before = {h.id for h in reader.search("headphones", k=DEPTH, rerank=False)}
    with Matcher.load(bundle, encoder=tiny_encoder) as writer:
        writer.add(frame([("x-1", "Acme green yoga mat extra", "x")]), show_progress=False)
        writer.remove(["b-3", "b-4"])
        live = writer.generation
    # the intermediate generation, which nobody reads, is gone; the reader's is kept and still searchable
    assert generations() == sorted([str(held), str(live)])
    assert collect_garbage(bundle) == []
    for rerank in (True, False):
        assert {h.id for h in reader.search("headphones", k=DEPTH, rerank=rerank)} == before
    assert reader.store.get([0])[0].external_id == "b-0"
    assert {h.id for h in in_new_thread(lambda: reader.search("headphones", k=DEPTH))} == before  # new connection
    # once the reader moves on, its old generation goes
    assert reader.refresh()
    assert reader.generation == live
    assert len(reader) == 19
    assert collect_garbage(bundle) == [held]
    assert generations() == [live]
    reader.close()
    assert collect_garbage(bundle) == []
    assert generations() == [live]
