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
import shlex
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
            host, uri = LOCAL, sc.location
            dest = remote_libvirt(sc.location)
            if dest is not None:
                from ..hosts.ssh import SshHost
                key = (dest.user, dest.host, dest.port)
                if key not in hosts:
                    hosts[key] = SshHost(dest, rundir, len(hosts), ssh_config=config.ssh_config)
                host = hosts[key]
                uri = _with_command(sc.location, host.wrapper)
            out.append(LibvirtSource(sc.location, list(config.domains), rundir, since=config.since,
                                     new_checkpoint=config.checkpoint, writable=config.writable, host=host,
                                     connect_uri=uri))
    return out


def remote_libvirt(uri: str):
    """The ssh destination of a libvirt URI on another host (``hosts.ssh.Destination``),
    None for this machine's libvirt; MountError for a remote transport other than ssh.

    A disk path libvirt gives is a path on the domain's host: it is read there,
    through ssh, never as a path of this machine.
    """
    from urllib.parse import parse_qs, urlsplit

    from ..hosts.ssh import Destination
    u = urlsplit(uri)
    transport = u.scheme.partition("+")[2]
    if not u.hostname or (u.hostname in ("localhost", "127.0.0.1", "::1") and transport in ("", "unix")):
        return None
    if transport != "ssh":
        raise MountError(f"--connect {uri}: snapfs reads another host's disks through ssh: use "
                         f"{u.scheme.partition('+')[0]}+ssh://{u.netloc}{u.path} (docs/remote.md)")
    query = parse_qs(u.query)
    for name, why in (("command", "snapfs runs ssh itself (--ssh-config FILE hands it a configuration)"),
                      ("no_verify", "snapfs never turns host key checking off"),
                      ("proxy", "snapfs reaches libvirtd through its own ssh connection")):
        if name in query:
            raise MountError(f"--connect {uri}: drop {name}= from the URI: {why}")
    return Destination(u.username, u.hostname, u.port, "/")


def _with_command(uri: str, command: str) -> str:
    """``uri`` with libvirt's ``command=`` set to snapfs's ssh wrapper."""
    from urllib.parse import quote
    return uri + ("&" if "?" in uri else "?") + "command=" + quote(command, safe="/")


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
    remote_dirs = []
    for p in names:
        if p.startswith("ssh") and p.endswith(".remote"):
            with open(os.path.join(rundir, p)) as f:
                remote_dirs.append(f.read().strip())
    if not any(n.startswith("backup-") for n in names) and not remote_dirs:
        return
    for kind, location in info.get("sources", [["libvirt", info.get("source")]]):
        if kind != "libvirt" or not location:
            continue
        from .backup import abort_jobs_in
        try:
            dest = remote_libvirt(location)
        except MountError:
            continue
        if dest is None:
            abort_jobs_in(location, rundir)
            continue
        # Another host's jobs, in the connection's directory there: reached
        # with a connection of its own (the mount's died with it).
        wrapper = os.path.join(rundir, "ssh-cleanup")
        cmd = ["ssh", *(["-F", info["ssh_config"]] if info.get("ssh_config") else []), "-o", "BatchMode=yes", "-T"]
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in cmd) + ' "$@"\n')
        os.chmod(wrapper, 0o700)
        for d in remote_dirs:
            abort_jobs_in(_with_command(location, wrapper), d)
