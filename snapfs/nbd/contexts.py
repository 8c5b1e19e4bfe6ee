"""NBD metadata contexts snapfs asks for, and what their flags mean.

Pure: the names of the NBD protocol's metadata contexts ("Metadata
contexts") and qemu's extensions, and how block status replies become runs
(``read_block_status``), whatever the server's way of splitting them.
"""

from __future__ import annotations

import errno
from typing import Callable

from ..errors import TransportError
from ..extents import Run, add_run

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# The NBD block status length is 32 bits; ask for 4 GiB less 1 MiB at most,
# a multiple of every cluster and block size qemu uses.
MAX_STATUS_REQUEST = (1 << 32) - (1 << 20)


def dirty_context(bitmap: str) -> str:
    return DIRTY_BITMAP_PREFIX + bitmap


def read_block_status(size: int, contexts: tuple[str, ...], request: Callable,
                      start: int = 0) -> dict[str, list[Run]]:
    """Runs ``(start, length, flags)`` of every context over ``[start, size)``.

    ``size`` is where the runs end (the export's size, or the end of the
    area a writer changed).

    request: ``request(length, offset, callback)`` sends one block status
    request; the server calls ``callback(context, offset, entries, err)``
    once per context, ``entries`` being ``[length, flags, ...]``.

    Contexts may answer with different lengths, shorter than asked, or past
    the end asked for (NBD spec, "BLOCK_STATUS")::

        asked              [pos ............................ pos+length)
        base:allocation    |  8K  |  4K  |                   (short reply)
        dirty-bitmap       |       64K (clipped at size) .......|...
        next request       starts at pos + 12K, the lower mark

    Each context keeps its own high-water mark, the next request starts at
    the lowest one, what a context repeats is dropped and what runs past
    ``size`` is clipped. Neighbouring runs with equal flags are merged as
    they arrive. A reply that moves no context forward is a protocol error.
    """
    covered = {ctx: start for ctx in contexts}
    runs: dict[str, list[Run]] = {ctx: [] for ctx in contexts}

    def extent(metacontext, offset, entries, err):
        if metacontext not in runs:
            return 0
        out = runs[metacontext]
        pos = offset
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            start, end = max(pos, covered[metacontext]), min(pos + length, size)
            pos += length
            if end <= start:
                continue
            add_run(out, start, end - start, flags)
            covered[metacontext] = end
        return 0

    while True:
        pos = min(covered.values(), default=size)
        if pos >= size:
            break
        request(min(size - pos, MAX_STATUS_REQUEST), pos, extent)
        if min(covered.values()) <= pos:
            raise TransportError(f"server made no progress in block status at {pos}", errno.EPROTO)
    return runs
