"""Command line: ``snapfs mount``, ``snapfs umount`` and ``snapfs refresh``.

mount(8) and fstab reach snapfs through fuse3's ``mount.fuse3``, which runs
``snapfs SOURCE MOUNTPOINT -o OPTIONS`` for ``mount -t fuse.snapfs``;
``mount_form`` turns that into ``snapfs mount`` (docs/mounting.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

DEFAULT_URI = "qemu:///system"

DESCRIPTION = """\
snapfs presents a VM's disks as directories of sparse raw files:
  DISK/chain/   the disk as the guest saw it at every snapshot point
  DISK/layers/  each snapshot layer on its own
  DISK/dirty/   what changed since each dirty bitmap (checkpoint) started
Each view NAME.raw has NAME.map.json beside it (its extent map). Holes show
through SEEK_HOLE/SEEK_DATA and st_blocks, so cp, tar --sparse, rsync and
qemu-img convert copy only the data. What could not be offered is listed,
with the reason, in MOUNTPOINT/.snapfs-status. With --rw, the chain and
layer views of each disk's top image can be written: restore a disk with cp,
dd or qemu-img convert -n. Each view is also NAME.qcow2, a ready qcow2 file
composed from its map (a layer's names the one beneath it)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfs", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the disks of an image directory or of libvirt domains",
                       description="Mount every leaf image under DIR (and its backing chain), or "
                                   "every disk of libvirt domains, at MOUNTPOINT: read-only, or "
                                   "with --rw writable where a disk's top image is. "
                                   "Returns once the mount is live.")
    m.add_argument("--images", metavar="DIR", action="append",
                   help="directory of qcow2/raw images, here or on a host reached through ssh "
                        "(ssh://[USER@]HOST[:PORT]/ABSOLUTE/PATH); each leaf image becomes a disk "
                        "directory. Repeat, and mix with --connect, for several sources: each "
                        "then sits in a folder named after it")
    m.add_argument("--connect", metavar="URI", nargs="?", const=DEFAULT_URI, action="append",
                   help=f"libvirt URI (default {DEFAULT_URI}; another host's through ssh: "
                        "qemu+ssh://[USER@]HOST/system): MOUNTPOINT/DOMAIN/TARGET/ for every "
                        "disk of every domain, running or shut off (repeatable)")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    m.add_argument("--domain", metavar="NAME", action="append",
                   help="only this domain (repeat for more; with --connect)")
    m.add_argument("--since", metavar="CHECKPOINT",
                   help="the checkpoint whose dirty views the backup job of a running domain serves "
                        "(default: the newest; with --connect)")
    m.add_argument("--checkpoint", metavar="NAME",
                   help="create checkpoint NAME with the backup job of a running domain, so the "
                        "next incremental starts there (with --connect)")
    m.add_argument("--rw", "--writable", dest="rw", action="store_true",
                   help="writable mount: writes to the chain and layer views of each disk's top "
                        "image go into that image, in its own format (shut-off domains only in "
                        "libvirt mode); every other file stays read-only")
    m.add_argument("--watch", action="store_true",
                   help="scan DIR again by itself when images change (inotify), as snapfs refresh "
                        "does (with --images)")
    m.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("--debug", action="store_true", help="log every step (qemu-nbd commands, servers)")
    m.add_argument("--debug-fuse", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--allow-other", action="store_true",
                   help="let other users in; the kernel checks the owner and mode each view "
                        "takes from its images (needs user_allow_other in /etc/fuse.conf unless "
                        "you are root)")
    m.add_argument("--allow-outside-backing", action="store_true",
                   help="follow backing files and leaf symlinks that resolve outside DIR (off: a "
                        "crafted image or link must not make the mount read arbitrary host files)")
    m.add_argument("--ssh-config", metavar="FILE",
                   help="ssh configuration file for ssh:// sources (ssh -F FILE; default: the "
                        "user's ~/.ssh/config). ssh never prompts: keys or an agent are needed")
    m.add_argument("--connections", type=int, default=4, metavar="N",
                   help="NBD connections (requests in flight) per qemu-nbd (default: 4)")
    m.add_argument("--idle-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="stop a qemu-nbd this long after its last file is closed (default: 2)")
    m.add_argument("--retry-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long a read of a read-only view waits for a qemu-nbd (or backup job "
                        "export) that died to answer again before it fails with EIO; a qemu-nbd that "
                        "answers nothing that long is killed and restarted (default: 30)")
    m.add_argument("--cache-size", type=int, default=64, metavar="MIB",
                   help="MiB of view data kept in memory and read ahead, for all exports together "
                        "(default: 64, at least 4; one export keeps at most 16)")
    m.add_argument("--log", metavar="FILE",
                   help="log file when detached (default: in the runtime directory, printed)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="unmount and stop every qemu-nbd the mount started",
                       description="Unmount MOUNTPOINT, wait for its snapfs process to stop every "
                                   "qemu-nbd and libvirt backup job it started, and clean up after "
                                   "one that was killed. umount(8) and fusermount3 -u unmount too.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", help="a snapfs mount")
    u.add_argument("--force", action="store_true",
                   help="unmount even while files of the mount are open (snapfs umount refuses "
                        "otherwise, naming them and who opened them): their readers, a VM booted "
                        "from a view among them, get I/O errors from then on")

    r = sub.add_parser("refresh", help="see images that changed, or a new point in time of a domain",
                       description="Image-directory mounts: scan DIR again, without remounting: new "
                                   "leaves, layers and bitmaps appear, removed ones vanish, changed "
                                   "images get fresh maps; a disk with open files is left as it was "
                                   "(exit 1, naming it). libvirt mounts: end DOMAIN's backup job and "
                                   "start a new one (running domains), or read DOMAIN again (shut-off "
                                   "domains); no file of the domain may be open.")
    r.add_argument("mountpoint", metavar="MOUNTPOINT", help="a snapfs mount")
    r.add_argument("domain", metavar="DOMAIN", nargs="?", help="libvirt mounts: the domain")
    r.add_argument("--since", metavar="CHECKPOINT",
                   help="serve the dirty views of this checkpoint (default: the newest)")
    r.add_argument("--checkpoint", metavar="NAME", help="create checkpoint NAME with the new backup job")
    p.mount_parser = m  # mount_options() and the man page list its options
    return p


# mount(8) and fstab ------------------------------------------------------------

COMMANDS = ("mount", "umount", "refresh")
LIBVIRT_PREFIX = "libvirt:"
# What mount(8), systemd and fuse pass or keep, meaning nothing more to snapfs.
# mount(8) passes rw for every mount not made ro: rw is not --rw.
MOUNT8_IGNORED = frozenset({
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
    "nofail", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
    "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "diratime",
    "nodiratime", "sync", "async", "loud", "silent", "default_permissions",
})
MOUNT8_IGNORED_PREFIXES = ("x-", "comment=", "user=", "fsname=", "subtype=")


def mount_options() -> list[tuple[str, argparse.Action]]:
    """Every ``-o`` name of the mount(8) form with the ``snapfs mount`` option it sets.

    The name is the long option without its dashes, ``-`` written ``_``
    (``--allow-other``: ``allow_other``); ``--rw`` is ``writable`` (mount(8)
    passes ``rw`` for every mount). The source options are SOURCE instead,
    and ``--foreground`` is left out: mount(8) waits for the command to return.
    """
    out = []
    for action in _parser().mount_parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("images", "connect", "help", "foreground"):
            continue
        name = "writable" if action.dest == "rw" else longs[0][2:].replace("-", "_")
        out.append((name, action))
    return out


def mount_form(argv: list[str]) -> list[str]:
    """``SOURCE MOUNTPOINT -o OPTIONS`` (mount.fuse3) as ``snapfs mount`` arguments.

    SOURCE is an image directory, or a libvirt URI: ``SCHEME://...`` (such as
    ``qemu:///system``), ``libvirt:URI``, or ``libvirt`` for the default URI.
    ValueError for what cannot be understood.
    """
    words, opts = [], []
    it = iter(argv)
    for a in it:
        if a == "-o":
            v = next(it, None)
            if v is None:
                raise ValueError("-o needs OPTIONS")
            opts += [o for o in _split_options(v) if o]
        elif a.startswith("-o") and len(a) > 2:
            opts += [o for o in _split_options(a[2:]) if o]
        elif a.startswith("-") and a != "-":
            raise ValueError(f"unknown argument {a!r} (mount(8) form: SOURCE MOUNTPOINT -o OPTIONS)")
        else:
            words.append(a)
    if len(words) != 2:
        raise ValueError("the mount(8) form takes SOURCE MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = words
    if source == "libvirt" or source == LIBVIRT_PREFIX:
        out = ["mount", "--connect", DEFAULT_URI]
    elif source.startswith(LIBVIRT_PREFIX):
        out = ["mount", "--connect", source[len(LIBVIRT_PREFIX):]]
    elif source.startswith("ssh://"):
        out = ["mount", "--images", source]
    elif "://" in source and source.split("://", 1)[0].replace("+", "").isalnum():
        out = ["mount", "--connect", source]
    else:
        out = ["mount", "--images", source]
    known = dict(mount_options())
    read_only = False
    for opt in opts:
        name, eq, value = opt.partition("=")
        name = name.replace("-", "_")
        if name == "ro":
            read_only = True
            continue
        if name in MOUNT8_IGNORED or opt.startswith(MOUNT8_IGNORED_PREFIXES):
            continue
        action = known.get(name)
        if action is None:
            raise ValueError(f"unknown mount option {name!r} (see man snapfs, MOUNT OPTIONS)")
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:
            if eq:
                raise ValueError(f"mount option {name} takes no value")
            out.append(flag)
        elif not eq or not value:
            raise ValueError(f"mount option {name} needs a value: {name}={action.metavar or 'VALUE'}")
        else:
            out.append(f"{flag}={value}")  # a value may start with "-"
    if read_only and "--rw" in out:
        raise ValueError("mount options ro and writable contradict each other")
    return out + ["--", mountpoint]


def _split_options(text: str) -> list[str]:
    """Comma-separated options; a backslash escapes a comma (as fuse does)."""
    out, cur, esc = [], [], False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _setup_logging(debug: bool, stream=None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,
    )
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _fail(msg: str) -> int:
    print(f"snapfs: {msg}", file=sys.stderr)
    return 1


def _connect_default(argv: list[str]) -> list[str]:
    """``--connect MOUNTPOINT``: a libvirt URI always has a scheme (``qemu:///system``),
    so a following word without ':' is not one; the default URI goes in between."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a == "--connect" and i + 1 < len(out) and ":" not in out[i + 1] \
                and not out[i + 1].startswith("-"):
            out.insert(i + 1, DEFAULT_URI)
            break
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        try:
            argv = mount_form(argv)
        except ValueError as e:
            return _fail(str(e))
    args = _parser().parse_args(_connect_default(argv))
    if args.command == "umount":
        return _umount(args)
    if args.command == "refresh":
        return _refresh(args)
    if not args.images and not args.connect:
        return _fail("mount needs a source: --images DIR (or ssh://HOST/DIR), or --connect [URI]")
    if not args.connect and (args.domain or args.since or args.checkpoint):
        return _fail("--domain, --since and --checkpoint go with --connect")
    if args.watch and (not args.images or args.connect):
        return _fail("--watch goes with --images alone (libvirt mounts: snapfs refresh MOUNTPOINT DOMAIN)")
    if args.watch and any(d.startswith("ssh://") for d in args.images):
        return _fail("--watch needs a local image directory (inotify): for ssh:// sources, "
                     "snapfs refresh MOUNTPOINT")
    given = (args.images or []) + (args.connect or [])
    if len(set(given)) != len(given):
        return _fail("a source is given twice")
    for d in args.images or ():
        if d.startswith("ssh://"):
            from .hosts.ssh import parse_url
            try:
                parse_url(d)
            except ValueError as e:
                return _fail(f"--images {e}")
    if args.ssh_config and not os.path.isfile(args.ssh_config):
        return _fail(f"--ssh-config {args.ssh_config}: no such file")
    if args.connections < 1:
        return _fail("--connections must be at least 1")
    if not args.retry_timeout > 0:
        return _fail("--retry-timeout must be more than 0 (seconds)")
    if args.cache_size < 4:
        return _fail("--cache-size must be at least 4 (MiB: a chunk being read and one read ahead)")
    if args.foreground:
        return _foreground(args)
    return _detach(args)


def _umount(args) -> int:
    from .errors import MountError
    from .fs.mount import umount
    _setup_logging(False)
    from .fs.mount import describe_in_use
    try:
        busy = umount(args.mountpoint, force=args.force)
    except MountError as e:
        return _fail(str(e))
    if busy:
        print(f"snapfs: unmounted {args.mountpoint} with {len(busy)} file(s) open; their readers get I/O "
              f"errors from now on:\n{describe_in_use(busy)}", file=sys.stderr)
    return 0


def _refresh(args) -> int:
    from .errors import MountError
    from .fs.control import control_request
    try:
        msg = control_request(args.mountpoint, {"command": "refresh", "domain": args.domain,
                                                "since": args.since, "checkpoint": args.checkpoint})
    except MountError as e:
        return _fail(str(e))
    print(f"snapfs: {msg}")
    return 0


def _foreground(args) -> int:
    import trio

    from .config import MountConfig
    from .errors import MountError
    from .fs.mount import serve
    from .nbd.chunks import tune_malloc
    _setup_logging(args.debug)
    tune_malloc()
    ready_fd = args.ready_fd

    def ready():
        if ready_fd is not None:
            os.write(ready_fd, b"OK\n")
            os.close(ready_fd)

    try:
        trio.run(serve, MountConfig.from_args(args), ready)
    except MountError as e:
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {e}\n".encode())
        return _fail(str(e))
    except KeyboardInterrupt:
        pass
    return 0


def _detach(args) -> int:
    """Start the foreground process detached; return when it says the mount is live."""
    import dataclasses

    from .config import MountConfig
    from .errors import MountError
    from .runtime import runtime_base
    try:
        base = runtime_base()
    except MountError as e:
        return _fail(str(e))
    config = MountConfig.from_args(args)
    logfile = config.log or os.path.join(
        base, "snapfs-" + os.path.abspath(config.mountpoint).strip("/").replace("/", "_") + ".log")
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "snapfs", "mount", "--foreground", "--ready-fd", str(w)]
    cmd += dataclasses.replace(config, log=logfile).argv()
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.readline().strip()
    if line == "OK":
        print(f"snapfs: mounted {config.label} on {config.mountpoint} (log: {logfile})")
        return 0
    if line.startswith("ERR "):
        proc.wait()
        return _fail(line[4:])
    rc = proc.wait()
    return _fail(f"mount process exited with {rc} before the mount was live; see {logfile}")
