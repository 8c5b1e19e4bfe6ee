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

    def ssh_host(dest):
        """The one SshHost of a (user, host, port), counting the sources that use it."""
        from ..hosts.ssh import SshHost
        key = (dest.user, dest.host, dest.port)
        if key not in hosts:
            hosts[key] = SshHost(dest, rundir, len(hosts), ssh_config=config.ssh_config)
        hosts[key].users += 1
        return hosts[key]

    for sc in config.sources:
        if sc.kind == "images":
            from .imagedir import ImageDirectorySource
            host, root = LOCAL, sc.location
            if sc.location.startswith("ssh://"):
                from ..hosts.ssh import parse_url
                try:
                    dest = parse_url(sc.location)
                except ValueError as e:
                    raise MountError(f"--images {e}") from None
                host, root = ssh_host(dest), dest.path
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
                host = ssh_host(dest)
                from .backup import with_command
                uri = with_command(sc.location, host.wrapper)
            out.append(LibvirtSource(sc.location, list(config.domains), rundir, since=config.since,
                                     new_checkpoint=config.checkpoint, writable=config.writable, host=host,
                                     connect_uri=uri))
    return out


def remote_libvirt(uri: str):
    """The ssh destination of a libvirt URI on another host (``hosts.ssh.Destination``),
    None for this machine's libvirt; MountError for what snapfs cannot read safely.

    A disk path libvirt gives is a path on the domain's host: it is read there,
    through ssh, never as a path of this machine. A URI naming no host (or
    this machine) is this machine's libvirt, and ``LibvirtSource.connect``
    checks that the libvirtd it reached says so too.
    """
    import socket as sockets
    from urllib.parse import parse_qsl, unquote, urlsplit

    from ..hosts.ssh import Destination
    u = urlsplit(uri)
    try:
        port = u.port
    except ValueError:
        raise MountError(f"--connect {uri}: not a port number") from None
    if u.fragment:
        raise MountError(f"--connect {uri}: a libvirt URI has no #fragment")
    transport = u.scheme.lower().partition("+")[2]
    host = unquote(u.hostname or "")
    here = {"localhost", "127.0.0.1", "::1", sockets.gethostname().lower()}
    if not host or host.lower() in here:
        if not host and transport not in ("", "unix"):
            raise MountError(f"--connect {uri}: a {transport} transport with no host: snapfs cannot tell "
                             "which machine the disks are on (name the host, or use qemu:///system)")
        return None
    if transport != "ssh":
        raise MountError(f"--connect {uri}: snapfs reads another host's disks through ssh: use "
                         f"{u.scheme.partition('+')[0]}+ssh://{u.netloc}{u.path} (docs/remote.md)")
    query = {k.lower() for k, _ in parse_qsl(u.query, keep_blank_values=True)}
    for name, why in (("command", "snapfs runs ssh itself (--ssh-config FILE hands it a configuration)"),
                      ("no_verify", "snapfs never turns host key checking off"),
                      ("proxy", "snapfs reaches libvirtd through its own ssh connection")):
        if name in query:
            raise MountError(f"--connect {uri}: drop {name}= from the URI: {why}")
    return Destination(unquote(u.username) if u.username else None, host, port, "/")


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
                remote_dirs += [line for line in f.read().splitlines() if line]
    if not any(n.startswith("backup-") for n in names) and not remote_dirs:
        return
    for kind, location in info.get("sources", [["libvirt", info.get("source")]]):
        if kind != "libvirt" or not location:
            continue
        from .backup import abort_jobs_in, end_remote_jobs
        try:
            dest = remote_libvirt(location)
        except MountError:
            continue
        if dest is None:
            abort_jobs_in(location, rundir)
            continue
        end_remote_jobs(location, info.get("ssh_config"), remote_dirs, rundir)
