"""Reads of view data: 2 MiB chunks from the server, with readahead.

FUSE requests are at most 1 MiB (libfuse's max_pages). One NBD round trip per request
costs more than the copy itself: ``tests/bench_nbd.py`` measured about
600 MB/s for 128 KiB requests against 1 GB/s and more for 1 MiB requests,
four in flight; through a mount, 2 MiB chunks read faster than 1 MiB or
4 MiB ones (``dd bs=1M`` of a data extent: about 1.1 GB/s against 0.75 and
1.0). So data is fetched from qemu-nbd in aligned chunks, kept in a small
LRU per export, and a sequential reader gets the next chunks fetched ahead::

    FUSE reads   |r|r|r|r|r|r|r|r|r|r|r|r|r|r|r|r|
    chunks       |    chunk 7    |    chunk 8    | chunk 9 ...
                   ^ miss: fetch 7, and 8..8+READAHEAD-1 in the background

Only data pieces reach this module: zero and hole areas are answered from
the extent map (``ExtentMap.pieces``). Chunks that are zero or hole from end
to end are never fetched ahead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections import OrderedDict

import trio

from ..extents import ExtentMap

log = logging.getLogger(__name__)

CHUNK = 2 << 20
READAHEAD = 4
KEEP = 8  # chunks cached per export: 16 MiB


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep 1 MiB read buffers on the heap instead of fresh mmap()s.

    By default glibc serves every allocation above 128 KiB (each chunk and
    each FUSE reply) with its own mmap(), so every buffer is page-faulted in
    and zeroed anew: reads through libnbd ran at 1.2 GB/s that way and at
    3 GB/s with this (tests/bench_nbd.py, 1 MiB requests, 4 in flight).
    Memory stays bounded by what the chunk caches hold.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    ok &= mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    ok &= mallopt(_M_TOP_PAD, 4 << 20)
    return bool(ok)


class ChunkCache:
    """The chunks of one export, fetched once, shared by every open file.

    fetch: ``async fetch(length, offset) -> bytes``, the server's pread.
    spawn: starts a background task (the server pool's nursery), for readahead.
    """

    def __init__(self, fetch, spawn, size: int):
        self._fetch = fetch
        self._spawn = spawn
        self.size = size
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self._last: int | None = None

    async def _load(self, index: int) -> None:
        event = self._loading[index] = trio.Event()
        start = index * CHUNK
        try:
            data = await self._fetch(min(CHUNK, self.size - start), start)
        except Exception as e:
            self._errors[index] = e
        else:
            self._chunks[index] = data
            self._chunks.move_to_end(index)
            while len(self._chunks) > KEEP:
                self._chunks.popitem(last=False)
        finally:
            del self._loading[index]
            event.set()

    async def chunk(self, index: int) -> bytes:
        while True:
            data = self._chunks.get(index)
            if data is not None:
                self._chunks.move_to_end(index)
                return data
            event = self._loading.get(index)
            if event is None:
                await self._load(index)
            else:
                await event.wait()
            err = self._errors.pop(index, None)
            if err is not None:
                raise err

    def _prefetch(self, index: int, m: ExtentMap) -> None:
        last = (self.size - 1) // CHUNK
        for i in range(index + 1, min(index + 1 + READAHEAD, last + 1)):
            if i in self._chunks or i in self._loading:
                continue
            start = i * CHUNK
            if all(z for _, _, z in m.pieces(start, CHUNK)):
                continue
            self._spawn(self._background, i)

    async def _background(self, index: int) -> None:
        if index in self._chunks or index in self._loading:
            return
        await self._load(index)
        err = self._errors.pop(index, None)
        if err is not None:
            log.debug("readahead of chunk %d failed: %s", index, err)

    async def read(self, offset: int, length: int, m: ExtentMap) -> bytes:
        """Data bytes of ``[offset, offset + length)`` (a data piece of the map)."""
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        sequential = self._last is not None and first in (self._last, self._last + 1)
        self._last = last
        if sequential:
            self._prefetch(last, m)
        parts = []
        for i in range(first, last + 1):
            data = await self.chunk(i)
            lo = max(offset, i * CHUNK) - i * CHUNK
            hi = min(offset + length, (i + 1) * CHUNK) - i * CHUNK
            # A view of the chunk, not a copy: FUSE and join take any buffer.
            parts.append(memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)
