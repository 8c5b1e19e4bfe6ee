"""Tier 1: chains composed one layer at a time give the runs of the whole chain.

``data.status.BlockStatus`` composes the chain view of layer N as layer N over
the chain view of layer N-1 (kept in ``Chains``). Whatever order the views
are read in, and whatever a refresh forgets meanwhile, each export's runs
must be what composing all its layers at once gives: qemu's answer, as the
tier-3 tests check against ``qemu-img map``.
"""

from __future__ import annotations

import random
from itertools import pairwise

from snapfs.data.status import BlockStatus, Chains
from snapfs.formats import status as local
from snapfs.nbd.contexts import ALLOCATION_DEPTH, BASE_ALLOCATION
from snapfs.nbd.spec import ExportSpec

SIZE = 1 << 20


def reference(layers, size):
    """The runs of a chain, area by area, from the top layer down (no composing)."""
    alloc, depth = [], []
    cuts = sorted({0, size} | {s for lay in layers for s, _, _ in lay.kinds})
    for lo, hi in pairwise(cuts):
        flags, d = local.STATE_HOLE | local.STATE_ZERO, 0
        for i, lay in enumerate(layers):
            kind = next(k for s, n, k in lay.kinds if s <= lo < s + n)
            if kind != local.UNALLOCATED:
                flags, d = (0 if kind == local.DATA else local.STATE_HOLE | local.STATE_ZERO), i + 1
                break
        local.add_run(alloc, lo, hi - lo, flags)
        local.add_run(depth, lo, hi - lo, d)
    return alloc, depth


def random_layer(rng):
    kinds, pos = [], 0
    while pos < SIZE:
        n = min(SIZE - pos, rng.choice((4096, 65536, 3 * 4096, 1 << 18)))
        local.add_run(kinds, pos, n, rng.choice((local.UNALLOCATED, local.UNALLOCATED, local.ZERO, local.DATA)))
        pos += n
    return local.LayerStatus(SIZE, kinds)


class Host:
    """Layer statuses by path, as a host reads them from the files."""

    def __init__(self, statuses):
        self.statuses = statuses

    def layer_statuses(self, keys):
        return {key: self.statuses[key[0]] for key in keys}


def test_composing_layer_over_layer_is_the_area_by_area_answer():
    rng = random.Random(1)
    for _ in range(50):
        layers = [random_layer(rng) for _ in range(rng.randrange(1, 6))]
        composed = None
        for level, lay in enumerate(reversed(layers), 1):
            composed = local.compose(lay, composed, level)
        assert local.composed_runs(composed, len(layers)) == reference(layers, SIZE)


def test_chains_read_in_any_order_and_forgotten_midway_give_each_exports_runs():
    rng = random.Random(2)
    depth = 40  # more than Chains.LIMIT (16 here): entries are evicted on the way
    Chains.LIMIT, limit = 16, Chains.LIMIT
    try:
        paths = [f"/d/m{i:02d}.qcow2" for i in range(depth)]
        host = Host({p: random_layer(rng) for p in paths})
        bs = BlockStatus(None, from_files=True)
        # Chain views (layer i down to the base) and layer views (a layer alone).
        specs = [ExportSpec(tuple((p, "qcow2") for p in reversed(paths[:i + 1])), pins=(None,) * (i + 1),
                            host=host) for i in range(depth)]
        specs += [ExportSpec(((p, "qcow2"),), pins=(None,), host=host) for p in paths]
        order = list(range(len(specs))) * 3
        rng.shuffle(order)
        order = sorted(range(depth)) + order  # as ls -l chain/ reads them, then at random
        for step, k in enumerate(order):
            if step % 25 == 24:
                # A refresh found an image changed: it is read again.
                p = rng.choice(paths)
                host.statuses[p] = random_layer(rng)
                bs.forget(p)
            spec = specs[k]
            runs, _ = bs.from_images(spec, SIZE, {})
            want = reference([host.statuses[p] for p, _ in spec.layers], SIZE)
            assert (runs[BASE_ALLOCATION], runs[ALLOCATION_DEPTH]) == want, (step, k)
    finally:
        Chains.LIMIT = limit
