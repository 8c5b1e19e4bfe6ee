"""Layer views: one layer alone, zeroed areas kept apart from untouched ones."""

from __future__ import annotations

from .. import extents as ex
from ..nbd import contexts
from ..nbd.spec import ExportSpec
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

    def qcow2_backing(self):
        """The ``.qcow2`` of the layer beneath: same folder, relative name, format qcow2.

        A name with a colon gets ``./`` (qemu would take ``name:`` for a protocol).
        """
        if not self.layer.backing_path or self.below is None:
            return None
        name = self.below.qcow2_filename
        return ("./" + name if ":" in name else name), "qcow2"

    @property
    def qcow2_problem(self):
        if self.layer.backing_path and self.below is None:
            # Naming the image's own backing file instead would hand a path
            # snapfs may have refused to follow to whoever opens the copy.
            return (f"not offered: a layer's .qcow2 names the .qcow2 of the layer beneath it, and "
                    f"{self.layer.backing_path} has no layer view (see its own line)")
        return None

    def fill_spec(self):
        """The chain down from this layer, if every layer beneath has a view."""
        layers, v = [self.layer], self
        while v.layer.backing_path:
            v = v.below
            if v is None:
                return None
            layers.append(v.layer)
        return ExportSpec.of(layers) if len(layers) > 1 else None
