"""Layer views: one layer alone, zeroed areas kept apart from untouched ones."""

from __future__ import annotations

from .. import extents as ex
from ..nbd import contexts
from . import View


class LayerView(View):
    """One layer alone (``"backing": null``): only what it holds itself."""

    kind = "layer"
    folder = "layers"

    def build_map(self, runs):
        has_backing = self.layer.backing_path is not None
        ext = ex.allocation_extents(self.size, runs[contexts.BASE_ALLOCATION],
                                    runs.get(contexts.ALLOCATION_DEPTH), has_backing)
        return ex.ExtentMap(self.size, ext, is_data=lambda e: not e.hole, reads_zero=lambda e: e.zero)
