"""The bundle a :class:`~matching.Matcher` serves: one generation at a time, opened as a
:class:`~matching.search.Snapshot` under a lease, and moved on by :meth:`ServedBundle.refresh` and by this
process's own writes (which publish a new generation and then serve it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from matching import generation
from matching.bundle import (
    DEFAULT_LOCK_TIMEOUT,
    Manifest,
    collect_garbage,
    current_generation,
    lease_current,
    live_name,
    read_manifest,
)
from matching.encoder import Encoder
from matching.errors import BundleError
from matching.scorer import Scorer
from matching.search import Snapshot, open_snapshot
from matching.store import Store
from matching.types import ChangeReport, Preset, Retrieval
from matching.vectors import VectorIndex


def open_live(
    path: Path,
    *,
    model: str | Path | None = None,
    encoder: Encoder | None = None,
    device: str | None = None,
    preset: Preset | str | None = None,
    verify: bool = True,
    allow_encoder_mismatch: bool = False,
) -> Snapshot:
    """The live generation of the bundle at ``path``, leased and opened (see :func:`matching.search.open_snapshot`);
    the lease is released again if opening fails."""
    lease = lease_current(path)
    try:
        return open_snapshot(
            path,
            lease,
            encoder=encoder,
            model=model,
            device=device,
            preset=preset,
            verify=verify,
            allow_encoder_mismatch=allow_encoder_mismatch,
        )
    except BaseException:
        lease.release()
        raise


class ServedBundle:
    """One generation of a bundle, served: its parts, the bundle's path, and the moves to a newer generation."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        path: Path | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        allow_encoder_mismatch: bool = False,
        retrieval: Retrieval | str | None = None,
    ) -> None:
        self.encoder = snapshot.encoder
        # the default for searches: the bundle's (hybrid unless built otherwise); dense in bundles without BM25
        default = (snapshot.manifest.lexical or {}).get("retrieval", "hybrid") if snapshot.lexical else "dense"
        self.retrieval = Retrieval(retrieval or default)
        self.path = path
        self.lock_timeout = lock_timeout
        self.allow_encoder_mismatch = allow_encoder_mismatch  # kept for reloads after writes
        self._snap = snapshot

    # The parts of the generation served; replaced together by refresh() and by writes.
    @property
    def snapshot(self) -> Snapshot:
        """The generation being served, as one consistent set of parts (what trainers take)."""
        return self._snap

    @property
    def index(self) -> VectorIndex:
        return self._snap.index

    @property
    def store(self) -> Store:
        return self._snap.store

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    @property
    def scorer(self) -> Scorer:
        return self._snap.scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self._snap = dataclasses.replace(self._snap, scorer=scorer)

    @property
    def query_encoder(self) -> Encoder:
        return self._snap.query_encoder

    @query_encoder.setter
    def query_encoder(self, encoder: Encoder) -> None:
        self._snap = dataclasses.replace(self._snap, query_encoder=encoder)

    @property
    def generation(self) -> str | None:
        """The name of the bundle generation being served (``None`` for an unsaved matcher)."""
        return self._snap.generation

    # -- moving on -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store's database connections and this matcher's hold on its generation."""
        self._snap.handle.close()

    def refresh(self) -> bool:
        """Switch to the bundle's live generation if a writer published a newer one; ``True`` if it did.

        Searches already running finish on the generation they started with.
        """
        if self.path is None or live_name(self.path) == self.generation:
            return False
        self._reopen(collect=False)
        return True

    def _write(self, change: Callable[[Path], ChangeReport]) -> ChangeReport:
        """Run a catalogue change against the bundle, then serve the generation it published."""
        report = change(self._require_path())
        try:
            self._reopen()
        except BundleError as exc:  # a file the change carried without reading it is damaged
            raise BundleError(
                f"{report.operation} was published (generation {report.generation}), but this matcher cannot open "
                f"it: {exc}. The change is in the bundle, so do not repeat it; restore the damaged file from a copy "
                "(a verified load names every one), or rebuild the bundle"
            ) from None
        return dataclasses.replace(report, generation=self.generation or report.generation)

    def _publish(
        self, replaced: tuple[str, ...], write: Callable[[Path], None], manifest: Manifest, scorer: Scorer | None = None
    ) -> None:
        """A new generation with ``replaced`` rewritten, refused if another writer published since this matcher
        loaded (the change was made against this matcher's generation)."""
        path = self._require_path()
        base = current_generation(path) if self.generation is None else path / self.generation
        generation.publish(path, base, replaced, write, manifest, scorer=scorer, lock_timeout=self.lock_timeout)
        self._reopen()

    def _require_path(self) -> Path:
        if self.path is None:
            raise BundleError("this matcher has no bundle path to save into")
        return self.path

    def _reopen(self, *, collect: bool = True) -> None:
        """Serve the bundle's live generation (after a write, or a refresh); a writer also deletes the
        generations no reader holds any more. If another writer moved the bundle to another encoder (reencode,
        finetune), that encoder is loaded from the bundle, in this matcher's preset and device."""
        path = self._require_path()
        live = read_manifest(current_generation(path), verify=False).encoder.get("fingerprint")
        keep = self.allow_encoder_mismatch or live == self.encoder.fingerprint
        fresh = open_live(
            path,
            encoder=self.encoder if keep else None,
            preset=None if keep else self.encoder.preset,
            device=None if keep else str(self.encoder.device),
            verify=False,
            allow_encoder_mismatch=self.allow_encoder_mismatch,
        )
        self.encoder = fresh.encoder
        old, self._snap = self._snap, fresh
        del old  # its lease goes when the last search using it finishes
        if collect:
            collect_garbage(path)
