"""Dirty views: what changed since a bitmap (checkpoint) started, with zero status."""

from __future__ import annotations

from .. import extents as ex
from ..nbd import contexts
from ..nbd.spec import ExportSpec
from . import View


class DirtyView(View):
    """The current disk's data where the bitmap marks changes; zeros elsewhere.

    ``spec`` serves the disk with ``spec.bitmap`` as its dirty context.
    bitmap: the name users know (``user.snapfs.bitmap``): a libvirt backup
    job exports a checkpoint's bitmap under a name of its own.
    backupmode: ``incremental``, or ``full`` for a view that counts every
    area as changed (libvirt mode only; ``reason`` says why).
    """

    kind = "dirty"
    folder = "dirty"
    backupmode: str | None = None
    reason: str | None = None

    def __init__(self, disk, basename, layer, spec, size, bitmap: str | None = None):
        super().__init__(disk, basename, layer, spec, size)
        self.bitmap = bitmap or spec.bitmap

    def xattrs(self):
        x = super().xattrs()
        x["user.snapfs.bitmap"] = self.bitmap
        if self.backupmode is not None:
            x["user.snapfs.backupmode"] = self.backupmode
        return x

    @property
    def qcow2_backed(self):
        # No backing file recorded: rebased onto the previous backup by its user.
        return True

    def fill_spec(self):
        # The disk itself: unchanged areas read what the previous backup holds.
        return self.spec

    def build_map(self, runs):
        return self._dirty_map(runs[contexts.dirty_context(self.spec.bitmap)], runs)

    def _dirty_map(self, bitmap_runs, runs):
        ext = ex.dirty_extents(self.size, bitmap_runs, runs[contexts.BASE_ALLOCATION])
        return ex.ExtentMap(self.size, ext, is_data=lambda e: e.dirty,
                            reads_zero=lambda e: e.zero or not e.dirty)


class UnionDirtyView(DirtyView):
    """A checkpoint's bitmap copied into several layers: changed where any copy says so.

    ``spec`` serves the disk (reads and zero status, no bitmap);
    ``bitmap_specs`` each serve one layer alone with its copy of the bitmap.
    """

    backupmode = "incremental"

    def __init__(self, disk, basename, layer, spec, size, bitmap: str,
                 bitmap_specs: list[ExportSpec]):
        super().__init__(disk, basename, layer, spec, size, bitmap)
        self.bitmap_specs = bitmap_specs

    def specs(self):
        return [self.spec, *self.bitmap_specs]

    async def read_runs(self, status):
        runs = dict(await status.runs(self.spec, self.size))
        copies = [(await status.runs(s, self.size))[contexts.dirty_context(self.bitmap)]
                  for s in self.bitmap_specs]
        runs["union"] = ex.union_runs(self.size, *copies)
        return runs

    def build_map(self, runs):
        return self._dirty_map(runs["union"], runs)


class FullDirtyView(DirtyView):
    """No bitmap can be trusted for this checkpoint: every area counts as changed."""

    backupmode = "full"

    def __init__(self, disk, basename, layer, spec, size, bitmap: str, reason: str):
        super().__init__(disk, basename, layer, spec, size, bitmap)
        self.reason = reason

    def build_map(self, runs):
        ext = ex.full_dirty_extents(self.size, runs[contexts.BASE_ALLOCATION])
        return ex.ExtentMap(self.size, ext, is_data=lambda e: e.dirty,
                            reads_zero=lambda e: e.zero or not e.dirty)
