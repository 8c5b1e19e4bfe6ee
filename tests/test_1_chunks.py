"""The chunk caches of a mount in one budget (``nbd/chunks.py``), over a fake fetch.

Each export is a ``bytes`` of known content; ``fetch`` records what it was
asked and answers after a checkpoint, so fetches overlap as they do in
worker threads.
"""

import random

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from snapfs.nbd.chunks import CHUNK, KEEP, READAHEAD, ChunkBudget, ChunkCache

MiB = 1 << 20


def spawner(nursery):
    """The pool's ``spawn``: start a task, say so."""
    def spawn(fn, *args):
        nursery.start_soon(fn, *args)
        return True
    return spawn


class AllData:
    """An extent map that is data from end to end (``ExtentMap.pieces``'s shape)."""

    def pieces(self, offset, length):
        yield offset, length, False


class Export:
    """One export's content, its fetches and its cache."""

    def __init__(self, budget, nursery, chunks, seed=0, fail=()):
        self.content = random.Random(seed).randbytes(chunks * CHUNK)
        self.fetches: list[int] = []  # chunk index of every fetch
        self.lengths: list[int] = []  # and its length
        self.fail = set(fail)
        self.gate: trio.Event | None = None  # fetches wait for it, when set
        self.cache = ChunkCache(self.fetch, spawner(nursery), len(self.content), budget)

    async def fetch(self, length, offset):
        self.fetches.append(offset // CHUNK)
        self.lengths.append(length)
        await trio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if offset // CHUNK in self.fail:
            raise OSError("fake read error")
        return self.content[offset:offset + length]

    async def read(self, offset, length):
        return await self.cache.read(offset, length, AllData())


def held(budget, *exports):
    """Bytes the caches hold, as they count them, checked against the budget."""
    n = sum(len(d) for e in exports for d in e.cache._chunks.values())
    assert n == budget.held
    return n


async def test_lru_over_the_chunks_of_every_export():
    budget = ChunkBudget(3 * CHUNK)
    async with trio.open_nursery() as n:
        a, b = Export(budget, n, 8, 1), Export(budget, n, 1, 2)  # b: one chunk, nothing ahead
        for e, i in ((a, 0), (b, 0), (a, 3)):  # jumps: nothing fetched ahead
            assert await e.read(i * CHUNK, 4096) == e.content[i * CHUNK:i * CHUNK + 4096]
        assert await b.read(100, 10) == b.content[100:110]  # b's chunk 0 is the newest now
        assert await a.read(5 * CHUNK, 10) == a.content[5 * CHUNK:5 * CHUNK + 10]
        # a's chunk 0 was the oldest used: it went; b's chunk 0 stayed.
        assert list(a.cache._chunks) == [3, 5] and list(b.cache._chunks) == [0]
        assert budget.used == held(budget, a, b) == 3 * CHUNK
        await b.read(100, 10)
        assert b.fetches == [0]


async def test_chunks_fetched_ahead_are_kept_until_read_and_readahead_waits_for_room():
    budget = ChunkBudget(6 * CHUNK)  # readahead: at most 3 chunks
    async with trio.open_nursery() as n:
        a, b = Export(budget, n, 16, 1), Export(budget, n, 16, 2)
        await a.read(0, MiB)
        await a.read(MiB, MiB)  # sequential: chunks 1..4 ahead, room for 1..3
        await wait_all_tasks_blocked()
        assert sorted(a.fetches) == [0, 1, 2, 3] and budget.ahead == 3 * CHUNK
        # Chunks of b, read one by one (jumps), take the room of b's own used chunks:
        # a's reader is on its chunk 0, and what was fetched ahead for it stays.
        for i in (0, 4, 8, 12):
            await b.read(i * CHUNK, 10)
        assert sorted(a.cache._chunks) == [0, 1, 2, 3] and sorted(b.cache._chunks) == [8, 12]
        assert budget.used == held(budget, a, b) == 6 * CHUNK
        # a reads on: what was fetched for it is still there, and the readahead goes on.
        for off in range(CHUNK, 4 * CHUNK, MiB):
            assert await a.read(off, MiB) == a.content[off:off + MiB]
        await wait_all_tasks_blocked()
        assert sorted(a.fetches) == [0, 1, 2, 3, 4, 5, 6]
        assert budget.used <= budget.limit and budget.ahead <= budget.limit // 2


async def test_readahead_never_evicts_the_chunk_a_reader_is_on():
    # b reads small pieces of its one chunk (as cp does); a reads on, with readahead.
    budget = ChunkBudget(4 * CHUNK)
    async with trio.open_nursery() as n:
        a, b = Export(budget, n, 16, 1), Export(budget, n, 1, 2)
        for off in range(0, 4096 * 4, 4096):
            assert await b.read(off, 4096) == b.content[off:off + 4096]
        for off in range(0, 8 * CHUNK, MiB):
            assert await a.read(off, MiB) == a.content[off:off + MiB]
            await wait_all_tasks_blocked()
            assert 0 in b.cache._chunks and budget.used <= budget.limit
        assert await b.read(4096 * 4, 4096) == b.content[4096 * 4:4096 * 5]
        assert b.fetches == [0]
        assert len(a.fetches) == len(set(a.fetches)) and len(a.fetches) > 8  # once each, ahead too


async def test_a_reader_the_budget_has_no_room_for_reads_its_pieces_alone():
    budget = ChunkBudget(2 * CHUNK)
    async with trio.open_nursery() as n:
        a, b, c = (Export(budget, n, 4, seed) for seed in range(3))
        await a.read(0, 4096)
        await b.read(0, 4096)  # a and b are on their chunk 0: the budget is full
        for off in range(0, 3 * 4096, 4096):
            assert await c.read(off, 4096) == c.content[off:off + 4096]
        assert c.lengths == [4096] * 3 and not c.cache._chunks  # nothing more read, nothing kept
        assert list(a.cache._chunks) == [0] and list(b.cache._chunks) == [0]
        assert budget.used == held(budget, a, b, c) == 2 * CHUNK
        # Nor was anything evicted for it: a reads its chunk 0 again from the cache.
        assert await a.read(8192, 4096) == a.content[8192:12288] and a.fetches == [0]
        a.cache.close()  # a's export stopped: its room is c's
        assert await c.read(3 * 4096, 4096) == c.content[3 * 4096:4 * 4096]
        assert c.lengths[3:] == [CHUNK] and list(c.cache._chunks) == [0]


async def test_a_reader_that_jumps_gives_up_what_was_fetched_ahead():
    budget = ChunkBudget(16 * CHUNK)
    async with trio.open_nursery() as n:
        a = Export(budget, n, 16)
        await a.read(0, MiB)
        await a.read(MiB, MiB)
        await wait_all_tasks_blocked()
        assert budget.ahead == READAHEAD * CHUNK
        await a.read(12 * CHUNK, MiB)
        # Chunks 1-4 are now the first to go, before chunk 0 and chunk 12.
        assert budget.ahead == 0
        assert [i for _, i in budget._lru][READAHEAD:] == [0, 12]
        assert {i for _, i in list(budget._lru)[:READAHEAD]} == {1, 2, 3, 4}


async def test_one_export_keeps_at_most_keep_chunks():
    budget = ChunkBudget(64 * CHUNK)
    async with trio.open_nursery() as n:
        a = Export(budget, n, 32)
        for off in range(0, 20 * CHUNK, MiB):
            assert await a.read(off, MiB) == a.content[off:off + MiB]
            await wait_all_tasks_blocked()
            assert len(a.cache._chunks) <= KEEP
        assert sorted(a.fetches) == list(range(20 + READAHEAD))  # each chunk once
        assert budget.used == held(budget, a) == KEEP * CHUNK


async def test_a_closed_cache_is_freed_and_keeps_no_fetch_that_arrives_later():
    budget = ChunkBudget(16 * CHUNK)
    async with trio.open_nursery() as n:
        a, b = Export(budget, n, 8, 1), Export(budget, n, 8, 2)
        view = await a.read(100, 4096)
        assert isinstance(view, memoryview)
        await b.read(0, 10)
        pending = trio.Event()

        async def read_chunk_5():
            assert await a.read(5 * CHUNK, 10) == a.content[5 * CHUNK:5 * CHUNK + 10]
            pending.set()

        a.gate = trio.Event()
        n.start_soon(read_chunk_5)
        await wait_all_tasks_blocked()  # its fetch is under way
        assert budget.fetching == CHUNK
        assert a.cache.close() == CHUNK
        # The reply already made still reads right: the chunk went with the cache, not its bytes.
        assert bytes(view) == a.content[100:4196]
        a.gate.set()
        await pending.wait()  # the reader got its data; the cache kept nothing
        assert a.cache._chunks == {} and budget.used == held(budget, b) == CHUNK
        assert a.cache.close() == 0


async def test_a_failed_fetch_fails_every_reader_waiting_for_it_and_is_not_counted():
    budget = ChunkBudget(4 * CHUNK)
    async with trio.open_nursery() as n:
        a = Export(budget, n, 3, fail={2})  # chunk 2 is the last: nothing ahead
        errors = []

        async def reader():
            try:
                await a.read(2 * CHUNK + 7, 10)
            except OSError as e:
                errors.append(e)

        for _ in range(3):
            n.start_soon(reader)
    assert len(errors) == 3 and a.fetches == [2] and budget.used == 0


async def test_readers_beyond_the_budget_still_get_their_data():
    # Two chunks of budget, four readers at once: the fetches in flight need more.
    budget = ChunkBudget(2 * CHUNK)
    async with trio.open_nursery() as n:
        exports = [Export(budget, n, 4, seed) for seed in range(4)]
        for e in exports:
            async def reader(e=e):
                for off in range(0, 4 * CHUNK, MiB):
                    assert await e.read(off, MiB) == e.content[off:off + MiB]
                    assert held(budget, *exports) <= budget.limit
            n.start_soon(reader)
    assert budget.fetching == 0 and budget.used == held(budget, *exports) <= 2 * CHUNK


@pytest.mark.parametrize("size", [CHUNK // 2, 3 * CHUNK + 12345])
async def test_the_last_chunk_counts_what_it_holds(size):
    budget = ChunkBudget(8 * CHUNK)
    async with trio.open_nursery() as n:
        a = Export(budget, n, 4)
        a.content = a.content[:size]
        a.cache = ChunkCache(a.fetch, spawner(n), size, budget)
        assert await a.read(0, size) == a.content
        assert budget.used == held(budget, a) == size
