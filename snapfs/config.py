"""A mount's configuration, as the command line gave it: frozen, and all the
mount (``fs/mount.py``) and the sources know of the command line. Pure."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceConfig:
    """One ``--images DIR`` or ``--connect URI``: kind ``images`` or ``libvirt``."""

    kind: str
    location: str  # the directory (absolute), ssh://HOST/PATH, or the URI
    given: str  # as the user wrote it: the status file, fsname


@dataclass(frozen=True)
class MountConfig:
    mountpoint: str
    sources: tuple[SourceConfig, ...]
    domains: tuple[str, ...] = ()
    since: str | None = None
    checkpoint: str | None = None
    writable: bool = False
    watch: bool = False
    allow_other: bool = False
    allow_outside_backing: bool = False
    connections: int = 4
    idle_timeout: float = 2.0
    retry_timeout: float = 30.0  # a read waits this long for a dead read-only server (nbd/pool.py)
    cache_size: int = 64  # MiB, all chunk caches together (nbd/chunks.py)
    debug: bool = False
    debug_fuse: bool = False
    log: str | None = None
    ssh_config: str | None = None  # ssh -F FILE (absolute)

    @classmethod
    def from_args(cls, args) -> MountConfig:
        """From ``snapfs mount``'s parsed arguments (``cli.py``)."""
        sources = tuple(SourceConfig("images", d if d.startswith("ssh://") else os.path.abspath(d), d)
                        for d in args.images or ()) + \
            tuple(SourceConfig("libvirt", uri, uri) for uri in args.connect or ())
        return cls(mountpoint=args.mountpoint, sources=sources, domains=tuple(dict.fromkeys(args.domain or ())),
                   since=args.since, checkpoint=args.checkpoint, writable=args.rw, watch=args.watch,
                   allow_other=args.allow_other, allow_outside_backing=args.allow_outside_backing,
                   connections=args.connections, idle_timeout=args.idle_timeout,
                   retry_timeout=args.retry_timeout,
                   cache_size=args.cache_size, debug=args.debug,
                   debug_fuse=args.debug_fuse, log=args.log,
                   ssh_config=os.path.abspath(args.ssh_config) if args.ssh_config else None)

    @property
    def label(self) -> str:
        """The sources as given, for messages and the mount table."""
        return ", ".join(s.given for s in self.sources)

    def argv(self) -> list[str]:
        """``snapfs mount`` arguments that give this configuration back (the detached process's)."""
        out = ["--connections", str(self.connections), "--idle-timeout", str(self.idle_timeout),
               "--retry-timeout", str(self.retry_timeout),
               "--cache-size", str(self.cache_size)]
        for s in self.sources:
            out += ["--images", s.given] if s.kind == "images" else ["--connect", s.given]
        for name in self.domains:
            out += ["--domain", name]
        for opt in ("since", "checkpoint", "log", "ssh_config"):
            if getattr(self, opt):
                out += ["--" + opt.replace("_", "-"), getattr(self, opt)]
        for flag, on in (("debug", self.debug), ("allow-other", self.allow_other),
                         ("allow-outside-backing", self.allow_outside_backing), ("rw", self.writable),
                         ("watch", self.watch)):
            if on:
                out.append("--" + flag)
        return out + ["--", self.mountpoint]
