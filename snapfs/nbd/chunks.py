"""Reads of view data: 2 MiB chunks from the server, with readahead, in one budget.

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

A read its file made far from its last one (``scattered``: random I/O) is
not a stream: it is answered from a chunk held or arriving, else read alone
(up to ``SMALL`` bytes without a worker thread, ``fetch_small``), and
changes nothing of the cache (docs/design.md, "Scattered reads").

Memory: every export keeps at most ``KEEP`` chunks, and all the exports of a
mount share one ``ChunkBudget``, however many are read at once: the chunks
held and being fetched never take more. Eviction is LRU over the chunks
readers have used, across exports, but never takes a chunk a reader is on
(one of its reads in progress, or the first chunk of its latest read): a
reader of small pieces keeps its chunk until it moves on. A chunk fetched
ahead is kept until it is read (or its reader jumps elsewhere); readahead
takes at most half the budget, and only room that eviction frees. When no
room can be made for a chunk a reader needs (more readers at once than the
budget has chunks), the reader's piece is read from the server alone and
kept by no cache: more round trips, never more bytes. A stopped export's
cache is freed at once (``ChunkCache.close``), and the heap's free pages with
it (``trim_malloc``).

A reply may be a view of a chunk (a ``memoryview``, no copy). Chunks are
``bytes``, never changed: an evicted chunk a reply still references stays
valid, and goes when the reply does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections import OrderedDict
from collections.abc import Iterable

import trio

from ..extents import ExtentMap

log = logging.getLogger(__name__)

CHUNK = 2 << 20
READAHEAD = 4
KEEP = 16  # chunks cached per export: 32 MiB (a stream read out of order spans BEHIND + READAHEAD)
BEHIND = 8  # chunks a stream's read may lag behind its front (16 MiB: qemu-img convert's 8 x 2 MiB)
# All chunk caches of a mount together (snapfs mount --cache-size, in MiB):
# four exports read at once keep 8 chunks each; one read alone, up to KEEP.
DEFAULT_BUDGET_MIB = 64
# Scattered reads up to this size go to ``fetch_small`` (no worker thread).
SMALL = 128 << 10


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def tune_malloc() -> bool:
    """Keep 1 MiB read buffers on the heap instead of fresh mmap()s, in one arena.

    By default glibc serves every allocation above 128 KiB (each chunk and
    each FUSE reply) with its own mmap(), so every buffer is page-faulted in
    and zeroed anew: reads through libnbd ran at 1.2 GB/s that way and at
    3 GB/s with this (tests/bench_nbd.py, 1 MiB requests, 4 in flight).
    Memory stays bounded by the mount's ``ChunkBudget``.

    One arena: chunks are allocated in worker threads, which glibc gives
    arenas of their own, and an arena other than the main one gives back
    only a free top larger than the trim threshold: even ``malloc_trim``
    leaves the rest resident (tests/bench_memory.py: 128 chunks freed from
    8 threads left 128 MiB, and 12 MiB with one arena and ``trim_malloc``).
    The buffers are allocated with the GIL held, so more arenas bought no
    parallelism (bench_nbd's threads, 1 and 2 MiB requests: no slower).
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    ok &= libc.mallopt(_M_TOP_PAD, 4 << 20)
    ok &= libc.mallopt(_M_ARENA_MAX, 1)
    return bool(ok)


def trim_malloc() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``).

    With the mmap threshold raised, freed chunks stay on the heap, and glibc
    returns only a free top above the trim threshold by itself; chunks freed
    below others stay resident. ``malloc_trim(0)`` releases every free whole
    page (MADV_DONTNEED) and the top. Called when a cache is freed (a server
    stopped); False: not glibc, or nothing was released.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class ChunkBudget:
    """The memory every chunk cache of a mount shares (see the module's docstring).

    ``used`` bytes, the chunks the caches hold plus those being fetched for
    them, never exceed ``limit``: room is made before a fetch starts
    (``reserve``), or the fetch is not made for a cache.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0  # bytes held by caches or being fetched for them
        self.fetching = 0  # of which being fetched
        self.ahead = 0  # of which fetched (or being fetched) ahead, not read yet
        # (cache, index) -> bytes: chunks a reader used, oldest first ...
        self._lru: OrderedDict[tuple[ChunkCache, int], int] = OrderedDict()
        # ... and chunks fetched ahead that no reader used yet.
        self._unread: dict[tuple[ChunkCache, int], int] = {}

    @property
    def held(self) -> int:
        """Bytes of the chunks the caches hold."""
        return self.used - self.fetching

    def reserve(self, n: int, ahead: bool = False) -> bool:
        """Make room for a chunk of ``n`` bytes about to be fetched; False: there is none."""
        if ahead and self.ahead + n > self.limit // 2:
            return False
        if self.used + n > self.limit:
            # Evict nothing for a fetch that would not fit anyway.
            free = sum(m for (cache, index), m in self._lru.items() if not cache.is_current(index))
            if self.used - free + n > self.limit:
                return False
            self._evict(self.limit - n)
        self.used += n
        self.fetching += n
        if ahead:
            self.ahead += n
        return True

    def fetched(self, cache: ChunkCache, index: int, n: int, ahead: bool) -> None:
        """A reserved fetch arrived and ``cache`` holds it now."""
        self.fetching -= n
        (self._unread if ahead else self._lru)[(cache, index)] = n

    def unreserve(self, n: int, ahead: bool) -> None:
        """A reserved fetch failed, or arrived for a cache closed meanwhile."""
        self.used -= n
        self.fetching -= n
        if ahead:
            self.ahead -= n

    def is_unread(self, cache: ChunkCache, index: int) -> bool:
        return (cache, index) in self._unread

    def touch(self, cache: ChunkCache, index: int) -> None:
        """A reader used this chunk: the newest in the LRU."""
        key = (cache, index)
        n = self._unread.pop(key, None)
        if n is None:
            self._lru.move_to_end(key)
        else:
            self.ahead -= n
            self._lru[key] = n

    def give_up(self, cache: ChunkCache, indices: Iterable[int]) -> None:
        """Chunks fetched ahead for a reader that went elsewhere: the first to evict."""
        for index in indices:
            key = (cache, index)
            n = self._unread.pop(key, None)
            if n is not None:
                self.ahead -= n
                self._lru[key] = n
                self._lru.move_to_end(key, last=False)

    def forget(self, cache: ChunkCache, index: int) -> None:
        """``cache`` dropped this chunk by itself (its own limit, ``KEEP``)."""
        key = (cache, index)
        n = self._lru.pop(key, None)
        if n is None:
            n = self._unread.pop(key)
            self.ahead -= n
        self.used -= n

    def drop(self, cache: ChunkCache) -> int:
        """Forget every chunk of ``cache`` (closed); the bytes freed."""
        freed = 0
        for chunks in (self._lru, self._unread):
            for key in [k for k in chunks if k[0] is cache]:
                n = chunks.pop(key)
                freed += n
                if chunks is self._unread:
                    self.ahead -= n
        self.used -= freed
        return freed

    def _evict(self, target: int) -> None:
        """Evict used chunks no reader is on, oldest first, until ``used <= target``."""
        for key in list(self._lru):
            if self.used <= target:
                return
            cache, index = key
            if not cache.is_current(index):
                self.used -= self._lru.pop(key)
                cache._evicted(index)


def _spans(offset: int, length: int, first: int, last: int):
    """``(chunk, lo, hi)``: the part ``[lo, hi)`` of each chunk from ``first`` to
    ``last`` that ``[offset, offset + length)`` covers."""
    for i in range(first, last + 1):
        yield i, max(offset, i * CHUNK) - i * CHUNK, min(offset + length, (i + 1) * CHUNK) - i * CHUNK


class _Fetch:
    """One chunk being fetched: every reader waiting for it gets its outcome."""

    __slots__ = ("event", "data", "error")

    def __init__(self):
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    """The chunks of one export, fetched once, shared by every open file.

    fetch: ``async fetch(length, offset) -> bytes``, the server's pread.
    spawn: ``spawn(fn, *args) -> bool`` starts a background task (the server
    pool's nursery), for readahead; False: it started none.
    fetch_small: the same as ``fetch`` for reads of at most ``SMALL`` bytes
    that are not a chunk (scattered reads), whose round trip costs more than
    their bytes.
    budget: the mount's ``ChunkBudget``, shared by every export's cache.
    """

    def __init__(self, fetch, spawn, size: int, budget: ChunkBudget, readahead: int = READAHEAD,
                 fetch_small=None):
        self.readahead = readahead
        self._fetch = fetch
        self._fetch_small = fetch_small or fetch
        self._spawn = spawn
        self._budget = budget
        self.size = size
        self.closed = False
        self._chunks: OrderedDict[int, bytes] = OrderedDict()  # oldest used first
        self._loading: dict[int, _Fetch] = {}
        self._last: int | None = None  # the last chunk of the latest read
        self._first: int | None = None  # and its first
        self._reading: dict[int, int] = {}  # chunk -> reads in progress over it

    def is_current(self, index: int) -> bool:
        """Whether a reader is on this chunk: a read in progress, or the latest read began there."""
        return index == self._first or index in self._reading

    def close(self) -> int:
        """Drop every chunk now (the server stopped); the bytes freed.
        Fetches still under way return their data to their readers only."""
        self.closed = True
        self._chunks.clear()
        return self._budget.drop(self)

    def _evicted(self, index: int) -> None:
        """The budget took this chunk back for another."""
        del self._chunks[index]

    def _keep(self, index: int, data: bytes, ahead: bool, n: int) -> None:
        self._chunks[index] = data
        self._budget.fetched(self, index, n, ahead)
        while len(self._chunks) > KEEP:
            # The oldest chunk a reader used and is not on, else the oldest
            # fetched ahead; never one a reader is on (the budget still bounds them).
            victim = next((i for i in self._chunks if not self._budget.is_unread(self, i)
                           and not self.is_current(i)), None)
            if victim is None:
                victim = next((i for i in self._chunks if not self.is_current(i)), None)
            if victim is None:
                break
            del self._chunks[victim]
            self._budget.forget(self, victim)

    async def _fill(self, index: int, f: _Fetch, n: int, ahead: bool) -> None:
        """Fetch a chunk the budget made room for (``reserve``); ``f`` is in ``_loading``."""
        try:
            f.data = await self._fetch(n, index * CHUNK)
        except Exception as e:
            f.error = e
        finally:
            del self._loading[index]
            if f.data is not None and not self.closed:
                self._keep(index, f.data, ahead, n)
            else:
                self._budget.unreserve(n, ahead)
            f.event.set()

    async def _piece(self, index: int, lo: int, hi: int):
        """Bytes ``[lo, hi)`` of chunk ``index``: a view of the cached chunk, or,
        when the budget has no room for it, read alone."""
        while True:
            data = self._chunks.get(index)
            if data is None:
                f = self._loading.get(index)
                if f is None:
                    n = min(CHUNK, self.size - index * CHUNK)
                    if not self._budget.reserve(n):
                        return await self._fetch(hi - lo, index * CHUNK + lo)
                    f = self._loading[index] = _Fetch()
                    await self._fill(index, f, n, ahead=False)
                else:
                    await f.event.wait()
                if f.error is not None:
                    raise f.error
                data = f.data
                if data is None:
                    continue  # its fetch was cancelled: fetch it again
            if index in self._chunks:
                self._chunks.move_to_end(index)
                self._budget.touch(self, index)
            # A view of the chunk, not a copy: FUSE and join take any buffer.
            return memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data

    async def _scattered(self, offset: int, length: int, first: int, last: int) -> bytes:
        if first == last:
            data = self._chunks.get(first)
            if data is None and first in self._loading:
                f = self._loading[first]
                await f.event.wait()
                data = f.data
            if data is None:
                # Not near the end: the small reads' buffers, widened, fit (``client``).
                small = length <= SMALL and offset - offset % 4096 + 2 * SMALL <= self.size
                return await (self._fetch_small if small else self._fetch)(length, offset)
            lo = offset - first * CHUNK
            return memoryview(data)[lo:lo + length]
        return b"".join([await self._scattered(i * CHUNK + lo, hi - lo, i, i)
                         for i, lo, hi in _spans(offset, length, first, last)])

    def _prefetch(self, index: int, m: ExtentMap) -> None:
        """Fetch the chunks after ``index`` in the background, nearest first, while
        the budget has room for readahead: each takes its room now, in order."""
        last = (self.size - 1) // CHUNK
        for i in range(index + 1, min(index + 1 + self.readahead, last + 1)):
            if i in self._chunks or i in self._loading:
                continue
            start = i * CHUNK
            if all(z for _, _, z in m.pieces(start, CHUNK)):
                continue
            n = min(CHUNK, self.size - start)
            if not self._budget.reserve(n, ahead=True):
                break
            f = self._loading[i] = _Fetch()
            if not self._spawn(self._background, i, f, n):
                # No background task now (no file open, or unmounting): nothing fetched.
                del self._loading[i]
                self._budget.unreserve(n, ahead=True)
                f.event.set()
                break

    async def _background(self, index: int, f: _Fetch, n: int) -> None:
        await self._fill(index, f, n, ahead=True)
        if f.error is not None:
            log.debug("readahead of chunk %d failed: %s", index, f.error)

    async def read(self, offset: int, length: int, m: ExtentMap, scattered: bool = False) -> bytes:
        """Data bytes of ``[offset, offset + length)`` (a data piece of the map).

        scattered: the reader's file jumped here from elsewhere (``_ViewFileHandle._read_view``).
        What a cached or arriving chunk holds is answered from it; the rest
        is read alone, for this read only: a 4 KiB read of a VM's random
        I/O costs one 4 KiB request, not a 2 MiB chunk (0.5k IOPS that
        way, where qemu's own FUSE export gave 11k), and it leaves the
        chunks and readahead of the sequential readers as they were.
        """
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        if scattered:
            return await self._scattered(offset, length, first, last)
        prev = self._last
        # A stream's reads arrive out of order (qemu-img convert reads 8
        # buffers of 2 MiB at once): behind its front by up to BEHIND chunks,
        # a read goes on with the stream, and the front stays where it is.
        sequential = prev is not None and prev - BEHIND <= first <= prev + 1
        if prev is not None and not prev - BEHIND <= first <= prev + self.readahead:
            # The reader jumped: what was fetched ahead of it is evicted first.
            self._budget.give_up(self, [i for i in self._chunks if not first <= i <= last + self.readahead])
        self._first, self._last = first, max(last, prev) if sequential else last
        span = range(first, last + 1)
        for i in span:
            self._reading[i] = self._reading.get(i, 0) + 1
        try:
            parts = [await self._piece(i, lo, hi) for i, lo, hi in _spans(offset, length, first, last)]
        finally:
            for i in span:
                if self._reading[i] == 1:
                    del self._reading[i]
                else:
                    self._reading[i] -= 1
        if sequential:
            # After the chunks this read needs: readahead never takes their room.
            self._prefetch(max(last, self._last), m)
        return parts[0] if len(parts) == 1 else b"".join(parts)
