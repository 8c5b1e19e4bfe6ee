"""Where disks come from: an image directory, libvirt domains, libvirt backup jobs.

- ``base``: the protocol every source implements (units, scans, refreshes; pure);
- ``imagedir``: leaf images under a directory and their views (pure);
- ``watch``: ``--watch``, inotify on an image directory;
- ``bitmaps``: which copies of a dirty bitmap to trust (pure);
- ``libvirt_xml``: what libvirt's XML says (pure);
- ``libvirt``: domains, snapshots, checkpoints (the libvirt connection);
- ``backup``: pull-mode backup jobs of running domains.

``make_sources`` is the one place that knows which kinds exist.
"""

from __future__ import annotations

import os

from ..errors import MountError


def make_sources(config, rundir: str) -> list:
    """The sources of a mount (``config.MountConfig``), not yet opened."""
    out = []
    for sc in config.sources:
        if sc.kind == "images":
            from .imagedir import ImageDirectorySource
            out.append(ImageDirectorySource(sc.location, allow_outside=config.allow_outside_backing,
                                            writable=config.writable, watch=config.watch, label=sc.location))
        else:
            try:
                from .libvirt import LibvirtSource
            except ImportError as e:
                raise MountError(f"libvirt's Python module is missing ({e}): install python3-libvirt, "
                                 "or run make setup") from None
            out.append(LibvirtSource(sc.location, list(config.domains), rundir, since=config.since,
                                     new_checkpoint=config.checkpoint, writable=config.writable))
    return out


def clean_up_after(info: dict, rundir: str) -> None:
    """End what the sources of a mount whose snapfs died left behind (its
    ``mount.json``: ``info``; its runtime directory: ``rundir``)."""
    names = os.listdir(rundir) if os.path.isdir(rundir) else []
    if not any(n.startswith("backup-") for n in names):
        return
    for kind, location in info.get("sources", [["libvirt", info.get("source")]]):
        if kind == "libvirt" and location:
            from .backup import abort_jobs_in
            abort_jobs_in(location, rundir)
