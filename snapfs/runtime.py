"""Where mounts keep their state, and what the system says about them.

Each mount has a private 0700 runtime directory under the user's runtime base
(``$XDG_RUNTIME_DIR/snapfs`` or ``/tmp/snapfs-UID``), holding the qemu-nbd
sockets and pid files and ``mount.json`` (mountpoint, pid, log file), which
``snapfs umount`` uses to stop the mount and clean up after a crash. A libvirt
mount's also holds its control socket (``snapfs refresh``) and its backup
jobs' directories, which qemu must reach: it is 0711, in a base others can
search.

This module is pure (no pyfuse3, no libnbd, no libvirt): the mount, the
control channel and the backup jobs all build on it.
"""

from __future__ import annotations

import json
import os
import stat

from .errors import MountError


def runtime_bases() -> list[str]:
    """Where mounts keep their runtime directories: ``$XDG_RUNTIME_DIR/snapfs``
    (when set to a directory of ours: ``su``/``runuser`` may pass another
    user's on), and ``/tmp/snapfs-UID``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    bases = []
    if xdg:
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() \
                and os.access(xdg, os.W_OK | os.X_OK):
            bases.append(os.path.join(xdg, "snapfs"))
    return bases + [f"/tmp/snapfs-{os.getuid()}"]


def unsearchable_dir(directory: str, uid: int = -1, gid: int = -1) -> str | None:
    """The first of ``directory`` and its parents that uid:gid cannot search,
    or None. The default -1:-1 is any other user (the "other" bits)."""
    p = directory
    while True:
        st = os.stat(p)
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return p
        if p == "/":
            return None
        p = os.path.dirname(p)


def runtime_base(searchable: bool = False) -> str:
    """The runtime base, created 0700 if missing.

    searchable: the base must be reachable by other users (a libvirt backup
    job's socket and scratch files are qemu's, which runs as its own user):
    ``$XDG_RUNTIME_DIR`` (0700 by design) is skipped for ``/tmp``.
    """
    bases = runtime_bases()
    base = bases[0]
    if searchable and unsearchable_dir(os.path.dirname(base)) is not None:
        base = bases[-1]
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.getuid():
        raise MountError(f"runtime directory {base} is not a directory owned by you")
    if st.st_mode & 0o066:
        # Search permission may be granted (a libvirt backup job's directory
        # must be reachable by qemu's user), nothing more.
        os.chmod(base, st.st_mode & 0o711)
    return base


def mount_device(mp: str) -> str | None:
    """The "major:minor" of the mount at mp, an absolute path without
    symlinks, from mountinfo: no stat, since a FUSE mount may not answer yet
    (in its own process, before serving) or any more."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == mp:
                    return fields[2]
    except OSError:
        pass
    return None


def is_mounted(mountpoint: str) -> bool:
    return mount_device(os.path.realpath(mountpoint)) is not None


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _runtime_entries():
    for base in runtime_bases():
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            yield base, name


def find_mount(mountpoint: str) -> tuple[str, dict] | None:
    mp = os.path.realpath(mountpoint)
    for base, name in _runtime_entries():
        path = os.path.join(base, name, "mount.json")
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if os.path.realpath(info.get("mountpoint", "")) == mp:
            return os.path.dirname(path), info
    return None


def pid_alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by its new
    parent, since a detached snapfs is nobody's child) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
