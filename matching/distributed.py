"""The offline side on a Ray cluster (``engine="ray"``; the extra ``matching[ray]``).

Ray Data reads the catalogue's files (one read per file, with the same :class:`~matching.ingest.CatalogueReader`
and so the same rules and messages as a local build), encoder actors encode the titles (each loads the encoder
once), and this process receives the rows in catalogue order and writes them through the one generation writer
(:mod:`matching.building`): the store, vectors, BM25 and the FAISS index are built here, exactly as locally.

Why the index is built on the driver and not per shard: adding 1M vectors to IVF4096,SQ8 took 2% of the local
build's time (BENCHMARKS.md), so there is nothing to win on one machine by merging shards; at 100M titles the
plan in SCALE.md trains the coarse quantiser once and builds inverted lists per shard instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from matching.config import EncoderConfig
from matching.encoder import Encoder
from matching.errors import ConfigError, DuplicateIdError, MatchingError, ModelError
from matching.ingest import CatalogueReader, Encoded, catalogue_files, is_int_id, metadata_json
from matching.types import Engine, IdType

log = logging.getLogger(__name__)

# titles per call of an encoder actor. Measured on 2 cores (200k generated titles, one actor of 2 threads; the
# local build 86.6-87.6 s): 1,024 a call, the actor encoded 1,700-2,200 titles/s (build 126-144 s), 4,096 106-112 s,
# 16,384 2,650-2,670 titles/s, the local build's rate (100.5-101.4 s). Still ~6 s a call on one CPU actor, so the
# rows keep streaming; a catalogue of fewer than 16,384 titles an actor keeps some actors idle (and the bar moves
# in steps of 16,384); a GPU actor wants big calls anyway.
RAY_BATCH = 16_384
# Ray Data's target block size for the build's datasets (its default is 128 MiB): one file's rows read by one task
# made one block, and every row reached this process only after the last was encoded (200k titles: the first at
# 101 of 101 s), all vectors held in the object store meanwhile; at 1 MiB the first arrives after 6 s and the
# store rows are written while the rest encode (peak memory of the build 3.8 GB -> 2.9 GB).
RAY_BLOCK_BYTES = 1 << 20
# blocks a read or an encode call may put out before the driver has taken them. Ray Data's default of 2 made an
# actor wait for the driver after every 2 MiB of its output: 2.1-2.6 s between two calls of 16,384 titles (a
# call's ~28 MB are 28 blocks; 12 calls of one actor returning random vectors), 0.5-0.7 s at 8, 0.2-0.3 s at 32,
# 0.2 s at 64; in a 200k-title read and encode the gaps after a call fell from 2.4-2.7 s to 0.1-0.2 s, and in a
# 1M build each actor's time outside its calls from 108.8 s to 44.4 s. Bounded still: a call's output, or 64 MiB of
# a file read ahead.
RAY_BLOCKS_AHEAD = 64
# CPU threads for one encoder actor where the cluster does not say otherwise. One: two one-thread actors encode more
# titles a second than one actor of two threads, on both machines measured (200k generated titles, time inside the
# encode calls): Xeon with AMX 3,707 and 3,441 against 3,185 and 2,833; AMD EPYC without AVX-512 488 against 382,
# where the whole build took 471.0 s against 566.0 s (the local build 417.5 s). Each actor holds its own model.
_THREADS_PER_ENCODER = 1


def read_files(batch: dict[str, np.ndarray], settings: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data: the validated rows of each file in ``batch``, in chunks (one read per file)."""
    for index, name in zip(batch["index"], batch["file"], strict=True):
        # chunks of one actor call each: with the reader's own chunks (cut into 1 MiB blocks) the calls were
        # 16,384, ~5,300 and ~230 titles (200k titles), and the actors' shares of the work came out unequal
        reader = CatalogueReader(str(name), **{**settings, "chunksize": RAY_BATCH})
        before = 0
        for chunk in reader:
            n = len(chunk)
            skipped = np.zeros(n, dtype=np.int64)
            skipped[0] = reader.skipped - before
            before = reader.skipped
            yield {
                "file": np.full(n, int(index), dtype=np.int64),
                "row": np.asarray(chunk.rows, dtype=np.int64),
                "id": np.asarray(chunk.ids, dtype=object),
                "title": np.asarray(chunk.titles, dtype=object),
                "metadata": np.asarray([metadata_json(m) for m in chunk.metadata], dtype=object),
                "skipped": skipped,
                "keep": np.ones(n, dtype=bool),
            }
        if reader.skipped > before:  # bad rows after the last good one: a row that only carries the count
            yield {
                "file": np.array([int(index)]),
                "row": np.array([0]),
                "id": np.array([""], dtype=object),
                "title": np.array([""], dtype=object),
                "metadata": np.array(["{}"], dtype=object),
                "skipped": np.array([reader.skipped - before]),
                "keep": np.zeros(1, dtype=bool),
            }


class EncodeBatches:
    """Ray Data actor: loads the encoder once, then encodes each batch's titles."""

    def __init__(self, config: dict[str, Any], threads: int, fingerprint: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.encoder = Encoder.from_pretrained(EncoderConfig.from_dict(config))
        if self.encoder.fingerprint != fingerprint:  # an in-memory or changed model: its vectors would not match
            raise ModelError(
                f"the encoder an actor loaded from {config.get('model')!r} is not the one this build uses "
                f"(fingerprint {self.encoder.fingerprint} != {fingerprint}); save the model to a directory every "
                "node can read and build from it"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        began = time.time()  # the wall clock: the driver compares it with its own (its process, maybe its node)
        titles = [str(t) for t in batch["title"]]
        batch["vector"] = self.encoder.encode_titles(titles)
        seconds = np.zeros(len(titles))
        seconds[0] = time.perf_counter() - start
        batch["encode_seconds"] = seconds
        batch["encode_began"] = np.full(len(titles), began)
        batch["actor"] = np.full(len(titles), os.getpid(), dtype=np.int64)
        return batch


def actor_plan(encoders: int | None, *, cpus: int, gpus: int, node_cpus: int) -> tuple[int, int, float]:
    """How many encoder actors, the torch threads of each and the share of a GPU each takes, on a cluster of
    ``cpus`` and ``gpus`` whose smallest node has ``node_cpus`` (``encoders``: the caller's count, or None)."""
    encoders = encoders or (gpus or max(1, cpus // _THREADS_PER_ENCODER))
    threads = max(1, min(node_cpus, cpus // encoders))
    gpu_share = min(1.0, gpus / encoders) if gpus else 0.0  # more actors than GPUs share them, never wait
    return encoders, threads, gpu_share


def known_settings(settings: list[tuple[Any, str, Any]]) -> list[tuple[Any, str, Any]]:
    """The ``(owner, name, value)`` settings to apply: a private one (``_name``, such as the output buffer) that
    this Ray Data lacks is left out, as an upgrade may rename it and the build runs without it (slower between
    calls); a public one is kept, so that one missing fails the build (the rows' order depends on one)."""
    kept: list[tuple[Any, str, Any]] = []
    for owner, name, value in settings:
        if hasattr(owner, name) or not name.startswith("_"):
            kept.append((owner, name, value))
        else:
            log.warning("this Ray Data has no setting %r: the build runs without it", name)
    return kept


def cause(exc: BaseException) -> MatchingError | None:
    """The :class:`MatchingError` a Ray task raised, found through Ray's wrappers."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # Ray re-raises a task's error as a class deriving from both RayTaskError and the error: look past it
        if isinstance(e, MatchingError) and not any(c.__module__.startswith("ray") for c in type(e).__mro__):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


class RaySource:
    """A build's rows, read and encoded on a Ray cluster, received here in catalogue order."""

    def __init__(
        self,
        source: str | Path | pd.DataFrame,
        settings: dict[str, Any],
        encoder: Encoder,
        *,
        address: str | None = None,
        encoders: int | None = None,
    ) -> None:
        if isinstance(source, pd.DataFrame):
            raise ConfigError("engine='ray' reads files: write the DataFrame to Parquet/CSV, or build it locally")
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise ConfigError("engine='ray' needs Ray Data: pip install 'matching[ray]'") from None
        if encoders is not None and encoders < 1:
            raise ConfigError(f"encoders must be >= 1, got {encoders}")
        self.source = source
        self.files = catalogue_files(source)  # a missing or empty source fails here, before any cluster work
        self.settings = settings
        self.encoder = encoder
        self.address = address
        self.encoders = encoders
        self.name = repr(str(source))
        self.title_columns = CatalogueReader(self.files[0], **settings).title_columns  # the reader's own rule
        self.count = self.skipped = 0
        self.skipped_examples: list[str] = []
        self._all_int = True
        self._plan: dict[str, Any] = {}
        self._actors: dict[int, list[float]] = {}
        self._started = 0.0  # time.time() when the rows were asked for
        self._first_encode = float("inf")

    @property
    def id_type(self) -> IdType:
        return IdType.INT if self._all_int and self.count else IdType.STR

    def record(self) -> dict[str, Any]:
        per_actor = {str(pid): round(titles / seconds, 1) for pid, (titles, seconds) in self._actors.items() if seconds}
        # where a Ray build's time goes beside the encoding: the cluster's start, the actors' start and model load
        # and the first read, until an actor starts encoding (200k titles, 2 cores: 7.8-9.4 s, where the local
        # build's first encode starts after 0.2 s); and the time inside the actors' encode calls, summed over them
        first = round(self._first_encode - self._started, 3) if self._actors else None
        return {
            "engine": Engine.RAY.value,
            "files": len(self.files),
            **self._plan,
            "titles_per_second": per_actor,
            "first_encode_after_seconds": first,
            "actor_encode_seconds": round(sum(seconds for _, seconds in self._actors.values()), 3),
        }

    def __iter__(self) -> Iterator[Encoded]:
        import ray

        self._started = time.time()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield from self._run()
        except Exception as exc:
            found = cause(exc)
            if found is None or found is exc:
                raise
            raise found from None  # the file and row the read task named, not Ray's wrapping
        finally:
            if started_here:
                ray.shutdown()

    def _run(self) -> Iterator[Encoded]:
        import ray
        import ray.data

        nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
        cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
        node_cpus = min((int(n["Resources"].get("CPU", 1)) for n in nodes), default=1)
        encoders, threads, gpu_share = actor_plan(self.encoders, cpus=cpus, gpus=gpus, node_cpus=node_cpus)
        self._plan = {
            "encoders": encoders,
            "threads_per_encoder": threads,
            "gpus_per_encoder": gpu_share,
            "cluster_cpus": cpus,
            "cluster_gpus": gpus,
            "batch": RAY_BATCH,
        }
        ctx = ray.data.DataContext.get_current()
        ray_settings = known_settings(
            [
                (ctx.execution_options, "preserve_order", True),  # rows arrive in catalogue order: the same row ids
                (ctx, "enable_progress_bars", False),  # the build shows its own
                (ctx, "target_max_block_size", RAY_BLOCK_BYTES),  # rows stream to this process as they are encoded
                (ctx, "_max_num_blocks_in_streaming_gen_buffer", RAY_BLOCKS_AHEAD),
            ]
        )
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in ray_settings]  # put back afterwards
        ray_log = logging.getLogger("ray.data")
        level = ray_log.level
        try:
            ray_log.setLevel(max(level, logging.WARNING))  # its INFO lines announce every execution on stdout
            for owner, name, value in ray_settings:
                setattr(owner, name, value)
            items = [{"index": i, "file": str(f)} for i, f in enumerate(self.files)]
            ds: Any = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(
                read_files, batch_size=1, fn_kwargs={"settings": self.settings}, **self._read_args(encoders, gpus)
            )
            ds = ds.map_batches(
                EncodeBatches,
                batch_size=RAY_BATCH,
                num_cpus=1,
                num_gpus=gpu_share,
                compute=ray.data.ActorPoolStrategy(size=encoders),
                fn_constructor_kwargs={
                    "config": self.encoder.config().to_dict(),
                    "threads": threads,
                    "fingerprint": self.encoder.fingerprint,
                },
            )
            seen: dict[str, tuple[int, int]] = {}
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                yield self._receive(batch, seen)
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)
            ray_log.setLevel(level)

    def _read_args(self, encoders: int, gpus: int) -> dict[str, Any]:
        """How the files are read: inside the one CPU actor, or as tasks of their own that feed every actor."""
        if encoders == 1 or gpus:  # (GPU actors ask for other resources, so Ray Data never fuses the read into them)
            return {}
        import ray.data

        # Ray Data fuses a read that asks for the same resources as the actors into the actors' stage: each file is
        # then read and encoded by one actor, and a one-file catalogue kept every other actor idle (200k titles in
        # one file, 2 actors of 1 thread on 2 cores: the second never encoded a title, 121.3 and 123.7 s; read apart,
        # both encoded, 87.7 and 92.2 s, as fast as one actor of 2 threads). Apart, the reads ask for no CPU (actors
        # that take every CPU left reads of half a CPU none: the build hung) and run at most one per actor, so files
        # are not all opened at once (with no such cap: 112.6 s).
        return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=min(len(self.files), encoders))}

    def _receive(self, batch: dict[str, np.ndarray], seen: dict[str, tuple[int, int]]) -> Encoded:
        """Check ids across files (each read task checked its own file), count, and keep the rows."""
        self._first_encode = min(self._first_encode, float(batch["encode_began"].min()))
        self.skipped += int(batch["skipped"].sum())
        for pid in np.unique(batch["actor"]):
            mine = batch["actor"] == pid
            total = self._actors.setdefault(int(pid), [0.0, 0.0])
            total[0] += int((mine & batch["keep"]).sum())
            total[1] += float(batch["encode_seconds"][mine].sum())
        keep = np.flatnonzero(batch["keep"])
        ids = [str(batch["id"][i]) for i in keep]
        for i, ext_id in zip(keep, ids, strict=True):
            where = (int(batch["file"][i]), int(batch["row"][i]))
            first = seen.setdefault(ext_id, where)
            if first != where:
                raise DuplicateIdError(
                    f"id {ext_id!r} is in {str(self.files[first[0]])!r} row {first[1]} and again in "
                    f"{str(self.files[where[0]])!r} row {where[1]}. Ids must be unique across the source's files"
                )
            if self._all_int and not is_int_id(ext_id):
                self._all_int = False
        self.count += len(ids)
        return Encoded(
            ids,
            [str(batch["title"][i]) for i in keep],
            [str(batch["metadata"][i]) for i in keep],
            np.ascontiguousarray(batch["vector"][keep], dtype=np.float32),
        )
