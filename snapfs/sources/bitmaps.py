"""Which copies of a dirty bitmap make up the changes since it started.

A bitmap may live in several layers of a chain: libvirt adds an empty copy of
every checkpoint's bitmap to each new overlay, so the changes since the
checkpoint are the union of the copies from the top down. These rules decide
when that union can be trusted; a doubtful bitmap is never used. Both sources
(image directory, libvirt) use them. Pure: no pyfuse3, no libnbd, no libvirt.
"""

from __future__ import annotations

import os

from ..formats import Layer


def _resolver(chain: list[Layer]):
    """Resolve paths on the chain's host (``hosts/``); a layer as it was resolved when read."""
    host = chain[-1].host if chain else None
    realpath = host.realpath if host is not None else os.path.realpath

    def layer_real(lay: Layer) -> str:
        return lay.real or realpath(lay.path)
    return realpath, layer_real


def bitmap_verdict(chain: list[Layer], bitmap: str, active_then: str | None = None,
                   require_enabled: bool = True) -> tuple[list[Layer], str | None]:
    """The layers whose copies of ``bitmap`` make up the changes since the checkpoint.

    Returns (layers, None) when the bitmap chain can be trusted, else
    ([], reason). libvirt's rules (qemuBlockBitmapChainIsValid): the top
    layer has the bitmap, the copies below it have no gap, none is
    inconsistent. snapfs adds one: the image that was active when the
    checkpoint was made (``active_then``) must be in the chain and hold a
    copy, or changes made there after the checkpoint would be missed; and a
    checkpoint's bitmap must be enabled (``require_enabled``; in image mode a
    disabled bitmap is a user's choice, served as it is).
    """
    top_down = list(reversed(chain))
    holding = []
    ended = False
    for layer in top_down:
        bm = next((b for b in layer.bitmaps if b.name == bitmap), None)
        if bm is None:
            if not holding:
                return [], f"bitmap {bitmap!r} is missing from the top image {layer.path}"
            ended = True
            continue
        if ended:
            return [], (f"bitmap {bitmap!r} has a gap: {layer.path} has it, but an image above it "
                        "does not, so changes made there are not recorded")
        if bm.in_use:
            return [], (f"bitmap {bitmap!r} in {layer.path} is marked in use (inconsistent): "
                        "qemu did not close the image cleanly")
        holding.append(layer)
    if require_enabled and not next(b for b in holding[0].bitmaps if b.name == bitmap).auto:
        return [], (f"bitmap {bitmap!r} in the top image {holding[0].path} is disabled: it does not "
                    "record changes")
    if active_then is not None:
        realpath, layer_real = _resolver(chain)
        real = realpath(active_then)
        paths = [layer_real(lay) for lay in top_down]
        if real not in paths:
            return [], (f"the image that was active when the checkpoint was made ({active_then}) "
                        "is no longer in the disk's chain")
        if real not in [layer_real(lay) for lay in holding]:
            return [], (f"bitmap {bitmap!r} is missing from {active_then}, the image that was active "
                        "when the checkpoint was made: changes made there would be missed")
    return holding, None


def backing_verdict(chain: list[Layer], bitmap: str, active_then: str | None) -> str | None:
    """For a running domain, what can be checked before libvirt checks the rest.

    The active layer's header is stale while qemu runs, and libvirt checks
    it when the job starts. The backing layers are closed images: when the
    checkpoint was made while one of them was active, it and every layer
    above it must still hold the bitmap. Returns why not, or None.
    """
    if active_then is None:
        return None
    realpath, layer_real = _resolver(chain)
    paths = [layer_real(lay) for lay in chain]
    real = realpath(active_then)
    if real not in paths:
        return (f"the image that was active when the checkpoint was made ({active_then}) "
                "is no longer in the disk's chain")
    for layer in chain[paths.index(real):-1]:
        bm = next((b for b in layer.bitmaps if b.name == bitmap), None)
        if bm is None:
            return (f"bitmap {bitmap!r} is missing from {layer.path}, which was active after the "
                    "checkpoint was made: changes made there would be missed")
        if bm.in_use:
            return f"bitmap {bitmap!r} in {layer.path} is marked in use (inconsistent)"
    return None
