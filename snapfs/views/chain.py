"""Chain views: the disk as the guest saw it when a layer was the top."""

from __future__ import annotations

from .. import extents as ex
from ..nbd import contexts
from . import View


class ChainView(View):
    """The disk as the guest saw it when ``layer`` was the top of the chain."""

    kind = "chain"
    folder = "chain"

    def build_map(self, runs):
        has_backing = len(self.spec.layers) > 1
        ext = ex.allocation_extents(self.size, runs[contexts.BASE_ALLOCATION],
                                    runs.get(contexts.ALLOCATION_DEPTH), has_backing)
        return ex.ExtentMap(self.size, ext, is_data=lambda e: not e.zero, reads_zero=lambda e: e.zero)


class BackupChainView(ChainView):
    """``current`` of a running domain, read from its backup job's export.

    The export has no qemu:allocation-depth; its base:allocation hole flag
    already means "allocated in no layer" (qemu reports block status of the
    whole chain).
    """

    def build_map(self, runs):
        ext = ex.status_extents(self.size, runs[contexts.BASE_ALLOCATION])
        return ex.ExtentMap(self.size, ext, is_data=lambda e: not e.zero, reads_zero=lambda e: e.zero)
