"""Block status of every export: read once, kept for the mount's life.

Views of the same export (a base's chain and layer views, the shared layers
of two branches) share one answer. It comes from the image files where the
answer is certain (``formats/status.py``, through the images' host), else
from qemu (a server started for it and stopped right after, unless files
keep it). A mount that writes (``--rw``) always asks qemu: a writer's
qemu-nbd may hold tables it has not written yet.

``forget(image)``: the image changed (a writer closed, a refresh found it
changed); every export reading it is asked again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import trio

from ..extents import Run
from ..formats import status as local
from ..nbd.contexts import ALLOCATION_DEPTH, BASE_ALLOCATION
from ..nbd.pool import ServerPool
from ..nbd.spec import ExportSpec

log = logging.getLogger(__name__)


def _layer_keys(spec: ExportSpec) -> list[tuple]:
    """``(path, format, pin)`` of each layer of an export, top first."""
    pins = spec.pins or (None,) * len(spec.layers)
    return [(path, fmt, pin) for (path, fmt), pin in zip(spec.layers, pins, strict=True)]


class Chains:
    """Chains composed from their layers' files (``formats.status.compose``), the
    latest LIMIT, shared by the worker threads that read maps.

    The chain view of layer N is layer N over the chain view of layer N-1,
    most likely composed just before (``ls -l chain/`` goes up from the
    base): a 500-layer disk's chain views compose 500 layers, not 125,000.
    A chain is keyed by its top layer, its depth and its lowest layer: the
    layers between are what the headers name (a refresh forgets a chain
    whose image changed).
    """

    LIMIT = 16

    def __init__(self):
        self._lock = threading.Lock()
        # (top key, depth, lowest key) -> (composed runs, paths of the export it was made for)
        self._chains: OrderedDict[tuple, tuple[list, list[tuple]]] = OrderedDict()
        self.generation = 0

    def get(self, key: tuple) -> list | None:
        with self._lock:
            hit = self._chains.get(key)
            if hit is None:
                return None
            self._chains.move_to_end(key)
            return hit[0]

    def put(self, key: tuple, composed: list, keys: list[tuple], generation: int) -> None:
        """Keep a composed chain, unless a layer was forgotten since ``generation``."""
        with self._lock:
            if generation != self.generation:
                return
            self._chains[key] = (composed, keys)
            while len(self._chains) > self.LIMIT:
                self._chains.popitem(last=False)

    def forget(self, image: str) -> None:
        """Chains with ``image`` as a layer are stale."""
        with self._lock:
            self.generation += 1
            for k in [k for k, (_, keys) in self._chains.items() if any(x[0] == image for x in keys)]:
                del self._chains[k]


class BlockStatus:
    """The runs of every export, per metadata context (``nbd/contexts.py``).

    from_files: read plain images' block status from the files.
    """

    def __init__(self, pool: ServerPool, from_files: bool = False):
        self.pool = pool
        self.from_files = from_files
        self._runs: dict[ExportSpec, dict[str, list[Run]]] = {}
        self._locks: dict[ExportSpec, trio.Lock] = {}
        # Each layer's status read from its file, shared by every export it is in.
        self._layers: dict[tuple, local.LayerStatus | None] = {}
        self._chains = Chains()

    async def runs(self, spec: ExportSpec, size: int) -> dict[str, list[Run]]:
        """The runs of the whole export, from cache, the files or qemu."""
        runs = self._runs.get(spec)
        if runs is not None:
            return runs
        async with self._locks.setdefault(spec, trio.Lock()):
            runs = self._runs.get(spec)
            if runs is None and self.from_files and spec.socket is None:
                # The cache is only touched here, in trio's thread; what a
                # refresh forgot meanwhile (forget) is not kept.
                generation = self._chains.generation  # forget calls so far
                known = {k: self._layers[k] for k in _layer_keys(spec) if k in self._layers}
                runs, new = await trio.to_thread.run_sync(self.from_images, spec, size, known)
                if generation == self._chains.generation:
                    self._layers.update(new)
                    if runs is not None:
                        self._runs[spec] = runs
            if runs is None:
                srv = await self.pool.acquire(spec)
                try:
                    runs = self._runs[spec] = await srv.block_status(size)
                finally:
                    self.pool.release(srv, linger=False)
        return runs

    def cached(self, spec: ExportSpec) -> dict[str, list[Run]] | None:
        """The runs of ``spec`` if they were read already (nothing is started)."""
        return self._runs.get(spec)

    def forget(self, image: str) -> None:
        """Block status read before ``image`` changed is stale."""
        for spec in [s for s in self._runs if s.socket is None and s.image == image]:
            del self._runs[spec]
        for key in [k for k in self._layers if k[0] == image]:
            del self._layers[key]
        self._chains.forget(image)

    def forget_export(self, spec: ExportSpec) -> None:
        """An export that is gone (a finished backup job's)."""
        self._runs.pop(spec, None)

    def from_images(self, spec: ExportSpec, size: int, known: dict) -> tuple[dict | None, dict]:
        """The runs qemu-nbd would report for ``spec``, read from the image files
        (None when qemu must be asked: formats/status.py says when), and the
        layers' statuses read for it. In a worker thread: ``known`` is a copy of
        what was read before, and the caller keeps what is new."""
        if spec.snapshot is not None or spec.bitmap is not None or spec.writable:
            return None, {}
        generation = self._chains.generation
        keys = _layer_keys(spec)
        # Every layer not known yet, asked of its host at once (one round trip
        # for a remote host); a layer that must be left to qemu ends it.
        if any(k in known and known[k] is None for k in keys):
            return None, {}
        missing = [k for k in keys if k not in known]
        new = spec.host.layer_statuses(missing) if missing else {}
        layers = []
        for key in keys:
            status = known[key] if key in known else new.get(key)
            if status is None:
                return None, new
            layers.append(status)
        if any(lay.size != size for lay in layers):
            log.debug("block status of %s: asking qemu (the layers differ in size)", spec.describe())
            return None, new
        # The highest chain of the export already composed, then each layer above it over it.
        n = len(keys)

        def chain(i):  # from layer i down
            return keys[i], n - i, keys[-1]

        i, composed = 0, None
        while i < n and (composed := self._chains.get(chain(i))) is None:
            i += 1
        for j in range(i - 1, -1, -1):
            composed = local.compose(layers[j], composed, n - j)
            self._chains.put(chain(j), composed, keys, generation)
        alloc, depth = local.composed_runs(composed, len(layers))
        runs = {BASE_ALLOCATION: alloc}
        if ALLOCATION_DEPTH in spec.contexts:
            runs[ALLOCATION_DEPTH] = depth
        return runs, new
