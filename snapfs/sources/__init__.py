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
import subprocess

from ..errors import MountError


def make_sources(config, rundir: str) -> list:
    """The sources of a mount (``config.MountConfig``), not yet opened. Sources
    on the same remote host share its one ssh connection."""
    from ..hosts.local import LOCAL
    hosts: dict = {}
    out = []
    for sc in config.sources:
        if sc.kind == "images":
            from .imagedir import ImageDirectorySource
            host, root = LOCAL, sc.location
            if sc.location.startswith("ssh://"):
                from ..hosts.ssh import SshHost, parse_url
                try:
                    dest = parse_url(sc.location)
                except ValueError as e:
                    raise MountError(f"--images {e}") from None
                key = (dest.user, dest.host, dest.port)
                if key not in hosts:
                    hosts[key] = SshHost(dest, rundir, len(hosts), ssh_config=config.ssh_config)
                host, root = hosts[key], dest.path
            out.append(ImageDirectorySource(root, allow_outside=config.allow_outside_backing,
                                            writable=config.writable, watch=config.watch, host=host,
                                            label=sc.given))
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
    for p in names:
        if p.startswith("ssh") and p.endswith(".ctl"):
            # A master connection whose snapfs died (it dies with snapfs; this
            # is for one that was stopped, not killed, with it).
            subprocess.run(["ssh", "-S", os.path.join(rundir, p), "-O", "exit", "--", "x"],
                           capture_output=True, timeout=10)
    if not any(n.startswith("backup-") for n in names):
        return
    for kind, location in info.get("sources", [["libvirt", info.get("source")]]):
        if kind == "libvirt" and location:
            from .backup import abort_jobs_in
            abort_jobs_in(location, rundir)
