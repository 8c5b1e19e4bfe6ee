"""Tier 1: extent logic, no qemu."""

import errno

import pytest

from snapfs import extents as ex
from snapfs.extents import DirtyExtent, Extent, ExtentMap, SeekError

Z, H = ex.STATE_ZERO, ex.STATE_HOLE


def test_zip_runs_cuts_at_every_boundary():
    a = [(0, 10, 1), (10, 20, 2)]
    b = [(0, 4, 7), (4, 16, 8), (20, 10, 9)]
    assert list(ex.zip_runs(30, a, b)) == [
        (0, 4, (1, 7)), (4, 6, (1, 8)), (10, 10, (2, 8)), (20, 10, (2, 9))]


def test_merge_joins_equal_neighbours_only():
    got = ex.merge([Extent(0, 4, False, False), Extent(4, 4, False, False),
                    Extent(8, 4, True, False), Extent(12, 4, True, True), Extent(16, 4, True, True)])
    assert got == [Extent(0, 8, False, False), Extent(8, 4, True, False), Extent(12, 8, True, True)]


def test_layer_with_backing_keeps_zeroed_areas_apart_from_holes():
    #  data | zeroed here | not here
    alloc = [(0, 4, 0), (4, 8, Z), (12, 4, Z | H)]
    depth = [(0, 8, 1), (8, 8, 0)]
    assert ex.allocation_extents(16, alloc, depth, has_backing=True) == [
        Extent(0, 4, False, False), Extent(4, 4, True, False), Extent(8, 8, True, True)]


def test_layer_without_backing_counts_every_zero_area_as_hole():
    alloc = [(0, 4, 0), (4, 4, Z), (8, 8, Z | H)]
    depth = [(0, 8, 1), (8, 8, 0)]
    assert ex.allocation_extents(16, alloc, depth, has_backing=False) == [
        Extent(0, 4, False, False), Extent(4, 12, True, True)]
    # Raw images have no allocation depth at all.
    assert ex.allocation_extents(16, alloc, None, has_backing=False) == [
        Extent(0, 4, False, False), Extent(4, 12, True, True)]


def test_backing_without_depth_is_refused():
    with pytest.raises(ValueError):
        ex.allocation_extents(16, [(0, 16, 0)], None, has_backing=True)


def test_dirty_extents_carry_zero_status():
    # Seed 001: a dirty area the guest trimmed is dirty *and* zero.
    bitmap = [(0, 8, 0), (8, 8, 1)]
    alloc = [(0, 4, 0), (4, 8, Z | H), (12, 4, 0)]
    assert ex.dirty_extents(16, bitmap, alloc) == [
        DirtyExtent(0, 4, False, False), DirtyExtent(4, 4, False, True),
        DirtyExtent(8, 4, True, True), DirtyExtent(12, 4, True, False)]


def _layer_map(extents, size):
    return ExtentMap(size, extents, is_data=lambda e: not e.hole, reads_zero=lambda e: e.zero)


def test_seek_follows_the_view_predicate():
    m = _layer_map([Extent(0, 4, True, True), Extent(4, 4, True, False), Extent(8, 4, False, False),
                    Extent(12, 4, True, True)], 16)
    assert m.seek(0, True) == 4      # the zeroed area is data in a layer view
    assert m.seek(5, True) == 5
    assert m.seek(4, False) == 12
    assert m.seek(13, False) == 13
    with pytest.raises(SeekError) as e:
        m.seek(12, True)             # no data after 12
    assert e.value.errno == errno.ENXIO
    with pytest.raises(SeekError):
        m.seek(16, False)            # at the end: ENXIO, as for local files
    assert m.data_bytes == 8


def test_seek_hole_finds_the_virtual_hole_at_the_end():
    m = _layer_map([Extent(0, 16, False, False)], 16)
    assert m.seek(3, False) == 16
    assert m.seek(3, True) == 3


def test_pieces_split_reads_at_zero_boundaries_only():
    m = ExtentMap(32, [Extent(0, 8, False, False), Extent(8, 8, True, False),
                       Extent(16, 8, True, True), Extent(24, 8, False, False)],
                  is_data=lambda e: not e.hole, reads_zero=lambda e: e.zero)
    assert list(m.pieces(4, 24)) == [(4, 4, False), (8, 16, True), (24, 4, False)]
    assert list(m.pieces(30, 10)) == [(30, 2, False)]     # clipped at the end
    assert list(m.pieces(32, 10)) == []


def test_dirty_map_reads_zero_outside_dirty_areas():
    m = ExtentMap(16, [DirtyExtent(0, 8, False, False), DirtyExtent(8, 4, True, False),
                       DirtyExtent(12, 4, True, True)],
                  is_data=lambda e: e.dirty, reads_zero=lambda e: e.zero or not e.dirty)
    assert list(m.pieces(0, 16)) == [(0, 8, True), (8, 4, False), (12, 4, True)]
    assert m.seek(0, True) == 8
    assert m.seek(8, False) == 16
    assert m.data_bytes == 8


def test_json_has_the_documented_keys():
    m = _layer_map([Extent(0, 16, True, True)], 16)
    assert m.to_json() == b'[{"start": 0, "length": 16, "zero": true, "hole": true}]\n'
