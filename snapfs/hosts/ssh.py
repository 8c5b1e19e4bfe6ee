"""A hypervisor reached through ssh: its files listed and read with the
commands every Linux host has, qemu-nbd started there, its socket forwarded.

Nothing of snapfs is installed on the host: it needs sshd, a POSIX shell,
GNU coreutils and findutils, and qemu-nbd. Everything goes through one ssh
connection (``ControlMaster``), opened by ``open`` with the user's own ssh
(their ``~/.ssh/config``, keys and agent; ``--ssh-config FILE`` is ``ssh -F``),
never prompting (``BatchMode``), host keys checked as ssh checks them.

- **Names never meet a shell.** A command is a fixed script run by ``sh -c``;
  paths reach it as its arguments (quoted once for the remote login shell,
  ``shlex.quote``) or NUL-separated on its standard input (``xargs -0``).
- **One listing per scan.** ``walk`` lists the whole tree in one ``find``
  (types, stat fields); the files a scan opens then have
  their stat, real path and first ``HEAD`` bytes fetched in one more round
  trip (``prefetch``). A scan of 500 images costs a few round trips, not
  thousands. Reads beyond ``HEAD`` (a bitmap directory) are ``dd`` calls.
- **What the mount shows comes from the last scan.** ``stat`` answers from
  it (``snapfs refresh`` lists again); owner and group are the mounting
  user's, and the group and other bits are the remote file's "other" bits:
  with ``--allow-other`` others read only what everyone on the host may.
- **Block status comes from qemu on the host**: ``qemu-img map`` of every
  layer a map needs, alone and pinned, in one round trip (``layer_statuses``);
  snapfs reads no image metadata of a remote file to compute maps.
- **The connection's life is the mount's.** The master ``ssh`` dies with
  snapfs (``PR_SET_PDEATHSIG``); every session, qemu-nbd's included, ends
  with it, and a qemu-nbd whose session ends is killed by its own wrapper
  on the host (``nbd/remote.py``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import errno
import functools
import gzip
import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass

import trio

from ..errors import MountError, SourceError, Unavailable
from ..formats import status

log = logging.getLogger(__name__)

HEAD = 65536  # bytes of every image read in the scan's prefetch (a qcow2 header's cluster)
COMMAND_TIMEOUT = 60.0
BATCH = 128  # layer statuses fetched at once (``layer_statuses``)
CHUNK = 64  # of them per command; the commands run side by side
# sshd serves 10 sessions per connection by default (MaxSessions): 2 for
# commands, 1 for libvirt's connection, 7 for qemu-nbd servers running at once.
COMMAND_SESSIONS = 2
SERVER_SESSIONS = 7
CONNECT_TIMEOUT = 30.0
# The master notices a host that stopped answering after 3 x 5 s.
ALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclass(frozen=True)
class Destination:
    """``ssh://[USER@]HOST[:PORT]/ABSOLUTE/PATH``."""

    user: str | None
    host: str
    port: int | None
    path: str

    @property
    def name(self) -> str:
        """The host as given (``user.snapfs.host``, messages)."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{self.user}@" if self.user else "") + h + (f":{self.port}" if self.port else "")


_URL = re.compile(r"ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]/]+\]|[^:/\[\]]+)(?::(?P<port>[0-9]+))?(?P<path>/.*)?",
                  re.S)


def parse_url(text: str) -> Destination:
    """A destination, or ValueError with what is wrong. The path is taken as
    written (no %-decoding): ``ssh://kvm1/srv/my images`` names ``/srv/my images``."""
    m = _URL.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r}: expected ssh://[USER@]HOST[:PORT]/ABSOLUTE/PATH")
    host = m["host"].strip("[]")
    if not re.fullmatch(r"[A-Za-z0-9_.:%-]+", host) or host.startswith("-"):
        raise ValueError(f"{text!r}: not a host name")
    if m["user"] is not None and (m["user"].startswith("-") or any(c.isspace() for c in m["user"])):
        raise ValueError(f"{text!r}: not a user name")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    path = m["path"] or ""
    if not path.startswith("/"):
        raise ValueError(f"{text!r}: the path on the host must be absolute (ssh://HOST/ABSOLUTE/PATH)")
    path = os.path.normpath(path)
    if path.startswith("//"):
        path = path[1:]
    return Destination(m["user"], host, port, path)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def _pdeathsig(parent: int) -> None:
    """In the child: SIGTERM when snapfs dies (the master must not outlive it),
    and none at all if it died before this was set."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


class Unreachable(MountError):
    """The host cannot be reached (ssh's reason)."""


def _ssh_reason(err: bytes, rc: int) -> str:
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    # ssh's own warnings (added keys, which snapfs never causes) are not the reason.
    lines = [ln for ln in lines if not ln.startswith("Warning: Permanently added")]
    return " ".join(lines[-3:]) or f"ssh exited with status {rc}"


def _stat_result(mode, ino, dev, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns) -> os.stat_result:
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, atime_ns // 10**9, mtime_ns // 10**9,
                           ctime_ns // 10**9, atime_ns / 1e9, mtime_ns / 1e9, ctime_ns / 1e9,
                           atime_ns, mtime_ns, ctime_ns))


def _parse_stat(text: bytes) -> os.stat_result | None:
    """A ``STAT_FORMAT`` line (without its NUL), or None ("-": no such file)."""
    fields = text.split(b" ")
    if len(fields) != 10:
        return None
    f, ino, dev, n, uid, gid, size, at, mt, ct = fields
    return _stat_result(int(f, 16), int(ino), int(dev), int(n), int(uid), int(gid), int(size),
                        _ns(at), _ns(mt), _ns(ct))


def _ns(text: bytes) -> int:
    """``1796609837.4820505570`` (find's %T@) in nanoseconds."""
    sec, _, frac = text.partition(b".")
    return int(sec) * 10**9 + int((frac + b"000000000")[:9])


_TYPES = {b"f": stat.S_IFREG, b"d": stat.S_IFDIR, b"l": stat.S_IFLNK, b"b": stat.S_IFBLK,
          b"c": stat.S_IFCHR, b"p": stat.S_IFIFO, b"s": stat.S_IFSOCK}

# find's fields for every entry: type, target type, then stat fields; then
# the path, each NUL-terminated.
FIND_FORMAT = r"%y %Y %m %i %D %n %U %G %s %A@ %T@ %C@\0%p\0"
# The same for one file, followed (stat -L): raw mode in hex.
STAT_FORMAT = r"%f %i %d %h %u %g %s %.9X %.9Y %.9Z\0"

# What find cannot read (a directory closed to the ssh user) goes to stderr,
# for the status file; the listing still succeeds.
_SCRIPT_FIND = 'find -H "$1" -printf "$2"; exit 0'
# stdin: NUL-separated paths. For each, NUL-terminated: stat -L (or "-"),
# realpath -m, the first HEAD bytes gzipped in base64 (empty if not a readable
# file): a header's cluster is mostly zeros.
_SCRIPT_PREFETCH = (
    # One read of at most $2 bytes, without blocking, of a regular file that is
    # no symlink ($2 is 0 but for the files a listing found under the root: a
    # file reached otherwise is read only once the outside rule let it in).
    'xargs -0 sh -c \'fmt=$1 n=$2; shift 2; for f; do '
    'stat -L --printf "$fmt" -- "$f" 2>/dev/null || printf "%s\\0" -; '
    'realpath -zm -- "$f" 2>/dev/null || printf "%s\\0" "$f"; '
    'if [ "$n" -gt 0 ] && [ -f "$f" ] && [ ! -L "$f" ] && [ -r "$f" ]; then '
    'dd if="$f" bs="$n" count=1 iflag=nonblock status=none 2>/dev/null | gzip -1 | base64 -w0; fi; '
    'printf "\\0"; done\' sh "$1" "$2"')

# Arguments: triples PATH DEV:INO JSON-FILENAME (the layer alone, read through
# /dev/fd/3). Each path is looked at before it is opened (no symlink, a
# regular file, the inode scanned), and the descriptor after. For each,
# NUL-terminated: OK and qemu-img map's JSON, or ERR and why.
_SCRIPT_MAPS = (
    'while [ $# -ge 3 ]; do p=$1 pin=$2 j=$3; shift 3; '
    'if [ -L "$p" ] || [ ! -f "$p" ] || [ "$(stat -c %d:%i -- "$p" 2>/dev/null)" != "$pin" ]; then '
    'printf "ERR not the file scanned\\0"; continue; fi; '
    '{ if [ "$(stat -L -c %d:%i /dev/fd/3)" != "$pin" ]; then printf "ERR not the file scanned\\0"; '
    'elif out=$(qemu-img map --output=json "$j" 2>&1); then printf "OK%s\\0" "$out"; '
    'else printf "ERR%s\\0" "$out"; fi; } 3<"$p" 2>/dev/null || printf "ERR cannot open\\0"; done')


class _Entry:
    """What the last listing knows of one path."""

    __slots__ = ("lstat", "stat", "real", "head", "fetched")

    def __init__(self, lstat=None):
        self.lstat: os.stat_result | None = lstat
        self.stat: os.stat_result | None = None  # followed
        self.fetched = False  # stat, real and head asked for (``prefetch``)
        self.real: str | None = None
        self.head: bytes | None = None


class SshHost:
    """A hypervisor reached through ssh (the host protocol of ``hosts/__init__.py``)."""

    # Chunks fetched ahead (nbd/chunks.py): a round trip costs the network's
    # latency, so more are kept in flight than for a local server.
    readahead = 16
    server_sessions = SERVER_SESSIONS

    def __init__(self, dest: Destination, rundir: str, ident: int = 0, ssh_config: str | None = None):
        self.dest = dest
        self.name = dest.name
        self.ssh_config = ssh_config
        self.control = os.path.join(rundir, f"ssh{ident}.ctl")
        # ssh through the master connection, for libvirt's ssh transport
        # (qemu+ssh://...?command=WRAPPER): written by ``reach``.
        self.wrapper = os.path.join(rundir, f"ssh{ident}")
        self.rundir = rundir
        self.remote_dir: str | None = None  # the host's directory for qemu-nbd's sockets
        self.master: subprocess.Popen | None = None
        self.error: str | None = None  # why it is not connected now
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._expected: dict[tuple, int] = {}  # layer keys of the last scan, in its order
        self._statuses: dict[tuple, object] = {}  # layer statuses fetched (forget drops them)
        self._inflight: dict[tuple, threading.Event] = {}
        self.generation = 0  # expect and forget so far
        self.uid, self.gid = os.getuid(), os.getgid()
        self._commands = threading.Semaphore(COMMAND_SESSIONS)
        self.servers = 0  # qemu-nbd sessions open (nbd/remote.py), at most SERVER_SESSIONS
        self._forwards: dict[str, str] = {}  # a socket on the host -> its forward here
        self.users = 0  # sources using it (``release``)
        self.remote_dirs: list[str] = []  # every directory made there, for the cleanup of a killed snapfs
        self.ident = ident

    def __repr__(self) -> str:
        return f"SshHost({self.name!r})"

    # -- ssh -------------------------------------------------------------------

    def _base(self) -> list[str]:
        out = ["ssh"]
        if self.ssh_config:
            out += ["-F", self.ssh_config]
        # Never prompt; no terminal (it would rewrite the listings' newlines);
        # the user's RemoteCommand and host key updates are not for snapfs's commands.
        out += ["-o", "BatchMode=yes", "-T", "-o", "RemoteCommand=none", "-o", "UpdateHostKeys=no",
                "-S", self.control]
        if self.dest.port:
            out += ["-p", str(self.dest.port)]
        if self.dest.user:
            out += ["-l", self.dest.user]
        return out

    def client(self, *extra: str) -> list[str]:
        """``ssh`` through the master connection only: were it gone, the
        ProxyCommand fails at once instead of ssh connecting anew."""
        return self._base() + ["-o", "ControlMaster=no", "-o", "ProxyCommand=false", *extra, "--",
                               self.dest.host]

    def command(self, script: str, *args, limit: float | None = None) -> list:
        """``ssh ... HOST -- sh -c SCRIPT sh ARGS...``: the remote login shell
        parses one line in which everything is quoted. limit: seconds the
        script may run on the host (``timeout``): one that blocks there
        (a file that never answers) does not stay behind."""
        script = "LC_ALL=C; export LC_ALL\n" + script  # stat's and qemu's words, untranslated
        words = [b"timeout", str(int(limit)).encode()] if limit else []
        words += [b"sh", b"-c", script.encode(), b"sh",
                  *(a if isinstance(a, bytes) else os.fsencode(a) for a in args)]
        line = b" ".join(shlex.quote(w.decode("latin-1")).encode("latin-1") for w in words)
        return [*self.client(), line]

    def run(self, script: str, *args, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT,
            stderr: list | None = None) -> bytes:
        """The script's stdout; OSError(EIO) with ssh's or the script's reason.
        stderr: a list the script's stderr lines are added to."""
        t0 = time.monotonic()
        try:
            with self._commands:
                p = subprocess.run(self.command(script, *args, limit=timeout), input=input,
                                   capture_output=True, timeout=timeout + 10)
            log.debug("on %s: %s... (%d argument(s)): %.3f s", self.name, script.strip()[:24], len(args),
                      time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            raise OSError(errno.EIO, f"{self.name}: no answer within {timeout:.0f} s") from None
        if stderr is not None:
            stderr += p.stderr.decode(errors="surrogateescape").splitlines()
        if p.returncode:
            reason = _ssh_reason(p.stderr, p.returncode)
            if p.returncode == 255:
                self.error = reason
            raise OSError(errno.EIO, f"{self.name}: {reason}")
        return p.stdout

    async def reach(self) -> None:
        """Open the master connection; Unreachable with ssh's reason.

        Started from the mount's main thread: ``PR_SET_PDEATHSIG`` fires when
        the thread that started a process ends, and worker threads come and go.
        """
        self.close()
        if os.path.lexists(self.control):
            os.unlink(self.control)
        client = self.client()[:-2]  # without "-- HOST": libvirt names the host
        with open(self.wrapper, "w") as f:
            f.write("#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in client) + ' "$@"\n')
        os.chmod(self.wrapper, 0o700)
        cmd = self._base() + ["-M", "-N", "-o", "ControlPersist=no", *ALIVE, *await trio.to_thread.run_sync(
            self._cipher_preference), "--", self.dest.host]
        errfile = self.control + ".err"
        with open(errfile, "wb") as err:
            self.master = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=err, preexec_fn=functools.partial(_pdeathsig, os.getpid()))
        with trio.move_on_after(CONNECT_TIMEOUT):
            while not await trio.to_thread.run_sync(self._check):
                if self.master.poll() is not None:
                    break
                await trio.sleep(0.01)
        if not self.connected or not os.path.exists(self.control):
            with open(errfile, "rb") as f:
                reason = _ssh_reason(f.read(), self.master.returncode or 0)
            if self.master.poll() is None:
                reason = f"no connection within {CONNECT_TIMEOUT:.0f} s"
            await trio.to_thread.run_sync(self.close)
            self.error = reason
            raise Unreachable(f"{self.name}: {reason}")
        try:
            out = await trio.to_thread.run_sync(self.run, 'mktemp -d "${TMPDIR:-/tmp}/snapfs.XXXXXXXXXX"')
            self.remote_dir = os.fsdecode(out.strip())
            # For snapfs umount after a snapfs that was killed (sources.clean_up_after).
            self.remote_dirs.append(self.remote_dir)
            with open(self.control[:-4] + ".remote", "a") as f:
                f.write(self.remote_dir + "\n")
        except OSError as e:
            await trio.to_thread.run_sync(self.close)
            self.error = e.strerror
            raise Unreachable(e.strerror) from None
        self.error = None
        log.info("connected to %s", self.name)

    def _cipher_preference(self) -> list[str]:
        """AES-GCM first, where the CPU has AES instructions and the user's ssh
        configuration leaves the ciphers as ssh's defaults: one ssh process
        carries every byte, and AES-GCM costs about half of ChaCha20's CPU
        there (docs/remote.md). A configured choice is kept as it is."""
        try:
            with open("/proc/cpuinfo") as f:
                if " aes" not in f.read(1 << 16):
                    return []
            given = subprocess.run(self._base() + ["-G", "--", self.dest.host], capture_output=True, timeout=10)
            plain = subprocess.run(["ssh", "-F", "/dev/null", "-G", "--", self.dest.host], capture_output=True,
                                   timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return []

        def ciphers(p):
            return [ln for ln in p.stdout.splitlines() if ln.startswith(b"ciphers ")]
        if given.returncode or plain.returncode or ciphers(given) != ciphers(plain):
            return []
        return ["-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]

    def release(self) -> None:
        """A source using this host is closed: the last one closes the connection
        (sources on one host share it: one's close must not end another's jobs)."""
        self.users -= 1
        if self.users <= 0:
            self.close()

    def _check(self) -> bool:
        return os.path.exists(self.control) and subprocess.run(
            self._base() + ["-O", "check", "--", self.dest.host], capture_output=True).returncode == 0

    @property
    def connected(self) -> bool:
        return self.master is not None and self.master.poll() is None

    def close(self) -> None:
        """End the connection: every session (qemu-nbd's too) ends with it."""
        master = self.master
        if master is None:
            return
        if master.poll() is None and self.remote_dir:
            try:
                self.run('rm -rf -- "$1"', self.remote_dir, timeout=5)
            except OSError:
                pass
        self.master, self.remote_dir = None, None
        with self._lock:
            forwards, self._forwards = self._forwards, {}
        for here in forwards.values():
            try:
                os.unlink(here)
            except FileNotFoundError:
                pass
        if master.poll() is None:
            subprocess.run(self._base() + ["-O", "exit", "--", self.dest.host], capture_output=True, timeout=10)
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
        for p in (self.control, self.control + ".err"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- what the last listing knows -------------------------------------------

    def _translate(self, st: os.stat_result) -> os.stat_result:
        """A remote stat as the mount shows it: the mounting user's, its group
        and other bits the remote file's "other" bits (uid numbers on the host
        mean nothing here)."""
        other = st.st_mode & 0o7
        mode = stat.S_IFMT(st.st_mode) | 0o700 | other << 3 | other
        return os.stat_result((mode, st.st_ino, st.st_dev, st.st_nlink, self.uid, self.gid, *st[6:10],
                               st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns, st.st_mtime_ns,
                               st.st_ctime_ns))

    def _list(self, root: str) -> list[str]:
        """List ``root`` into the cache (what was known of other trees stays);
        find's complaints, as it said them."""
        said: list[str] = []
        out = self.run(_SCRIPT_FIND, root, FIND_FORMAT, stderr=said)
        entries: dict[str, _Entry] = {}
        parts = out.split(b"\0")
        for i in range(0, len(parts) - 1, 2):
            fields, path = parts[i].split(b" "), parts[i + 1]
            if len(fields) != 12:
                continue
            y, _yy, m, ino, dev, n, uid, gid, size, at, mt, ct = fields
            mode = _TYPES.get(y, 0) | int(m, 8)
            st = _stat_result(mode, int(ino), int(dev), int(n), int(uid), int(gid), int(size),
                              _ns(at), _ns(mt), _ns(ct))
            e = _Entry(st)
            if y != b"l":
                e.stat = st  # a symlink's target is stat'ed by the prefetch
            entries[os.fsdecode(path)] = e
        inside = root.rstrip("/") + "/"
        with self._lock:
            self._entries = {p: e for p, e in self._entries.items() if p != root and not p.startswith(inside)}
            self._entries.update(entries)
        return said

    def prefetch(self, paths, heads: bool = False) -> None:
        """Stat (followed), real path and (heads) first HEAD bytes of ``paths``, in one round trip."""
        paths = [p for p in dict.fromkeys(paths)]
        if not paths:
            return
        out = self.run(_SCRIPT_PREFETCH, STAT_FORMAT, str(HEAD if heads else 0),
                       input=b"".join(os.fsencode(p) + b"\0" for p in paths))
        parts = out.split(b"\0")
        got = {}
        for i, path in enumerate(paths):
            if 3 * i + 2 >= len(parts):
                break
            st_text, real, head = parts[3 * i], parts[3 * i + 1], parts[3 * i + 2]
            got[path] = (st_text, real, head)
        with self._lock:
            for path, (st_text, real, head) in got.items():
                e = self._entries.setdefault(path, _Entry())
                e.stat = _parse_stat(st_text)
                e.real = os.fsdecode(real)
                e.head = gzip.decompress(base64.b64decode(head)) if head else e.head
                e.fetched = True

    def _entry(self, path: str, follow: bool = True) -> _Entry:
        """What is known of ``path``; asked of the host (one round trip) when
        the listing did not reach it (a backing file outside the directory)."""
        path = os.path.normpath(path)
        with self._lock:
            e = self._entries.get(path)
        if e is None or (follow and not e.fetched):
            self.prefetch([path])
            with self._lock:
                e = self._entries.setdefault(path, _Entry())
        if not follow and e.lstat is None:
            self._lstat(path, e)
        return e

    def _lstat(self, path: str, e: _Entry) -> None:
        """lstat of a path the listing did not reach (one round trip)."""
        try:
            out = self.run('stat --printf "$1" -- "$2"; exit 0', STAT_FORMAT, path)
        except OSError:
            return
        st = _parse_stat(out.partition(b"\0")[0])
        with self._lock:
            e.lstat = st

    # -- the host protocol: files ----------------------------------------------

    def stat(self, path: str) -> os.stat_result:
        e = self._entry(path)
        if e.stat is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self._translate(e.stat)

    def lstat(self, path: str) -> os.stat_result:
        e = self._entry(path, follow=False)
        if e.lstat is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self._translate(e.lstat)

    def realpath(self, path: str) -> str:
        path = os.path.normpath(path)
        e = self._entry(path)
        return e.real or path

    def exists(self, path: str) -> bool:
        return self._entry(path).stat is not None

    def isfile(self, path: str) -> bool:
        st = self._entry(path).stat
        return st is not None and stat.S_ISREG(st.st_mode)

    def isdir(self, path: str) -> bool:
        st = self._entry(path).stat
        return st is not None and stat.S_ISDIR(st.st_mode)

    def islink(self, path: str) -> bool:
        st = self._entry(path, follow=False).lstat
        return st is not None and stat.S_ISLNK(st.st_mode)

    def walk(self, root: str, onerror=None):
        """As ``os.walk`` (top-down, symlinks not followed), from one listing;
        then every file and symlink in it prefetched."""
        root = os.path.normpath(root)
        try:
            said = self._list(root)
        except OSError as e:
            # Not an empty directory: the host is out of reach (a refresh keeps what was shown).
            raise SourceError(f"cannot list {root} on {self.name}: {e.strerror}") from None
        for line in said:
            m = re.fullmatch(r"find: '(.*)': (.*)", line)
            if m and onerror is not None:
                onerror(OSError(errno.EACCES if "ermission" in m[2] else errno.EIO, m[2], m[1]))
        with self._lock:
            entries = dict(self._entries)
        self.prefetch([root] + [p for p, e in entries.items() if e.lstat is not None] + _above(root), heads=True)
        with self._lock:
            entries = dict(self._entries)
        children: dict[str, tuple[list, list]] = {}
        for path, e in entries.items():
            if path == root or e.lstat is None or not path.startswith(root.rstrip("/") + "/"):
                continue
            parent, name = os.path.split(path)
            isdir = e.stat is not None and stat.S_ISDIR(e.stat.st_mode) if stat.S_ISLNK(e.lstat.st_mode) \
                else stat.S_ISDIR(e.lstat.st_mode)
            children.setdefault(parent, ([], []))[0 if isdir else 1].append(name)

        def visit(d):
            dirs, files = children.get(d, ([], []))
            dirs, files = sorted(dirs), sorted(files)
            yield d, dirs, files
            for name in dirs:
                p = os.path.join(d, name)
                if not stat.S_ISLNK(entries[p].lstat.st_mode):
                    yield from visit(p)
        if root in entries:
            yield from visit(root)

    def open(self, path: str):
        """The file, to read a header: its first HEAD bytes from the scan's
        prefetch, more with ``dd``. Only a regular file or a block device."""
        from .. import formats
        e = self._entry(path)
        if e.stat is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if (why := formats.not_an_image_file(e.stat.st_mode)) is not None:
            raise OSError(errno.EINVAL, why, path)
        if e.head is None:
            e.head = self.read_at(path, 0, min(HEAD, e.stat.st_size or HEAD))
        return RemoteFile(self, path, e.stat.st_size, e.head)

    def read_at(self, path: str, offset: int, length: int) -> bytes:
        """Bytes of a file on the host (read without blocking: not a FIFO's writer wait)."""
        return self.run('exec dd if="$1" iflag=skip_bytes,count_bytes,nonblock bs=65536 skip="$2" '
                        'count="$3" status=none', path, str(offset), str(length), timeout=30)

    def forget(self, path: str) -> None:
        """``path`` was written: asked of the host again at the next look."""
        path = os.path.normpath(path)
        with self._lock:
            e = self._entries.get(path)
            if e is not None:
                e.fetched = False
            for k in [k for k in self._statuses if k[0] == path]:
                del self._statuses[k]
            self.generation += 1

    def has_acl(self, path: str) -> bool:
        return False  # the "other" bits are the ACL's "other" entry: what ``stat`` shows is exact

    def locked_for_write(self, path: str) -> bool:
        return False  # qemu-nbd on the host refuses an image a VM writes (its lock), with qemu's reason

    def protocol_driver(self, path: str) -> str:
        st = self._entry(path).stat
        return "host_device" if st is not None and stat.S_ISBLK(st.st_mode) else "file"

    # -- block status, qemu ----------------------------------------------------

    def expect(self, keys: list[tuple]) -> None:
        """The layers (``(path, fmt, pin)``) a scan found, in its order: asking
        for one layer's status fetches the ones after it too (``BATCH``), so a
        first ``ls -lR`` costs a few round trips, not one per disk."""
        with self._lock:
            self.generation += 1  # a fetch under way keeps nothing: it may be older than the scan
            for k in keys:
                self._statuses.pop(k, None)
                self._expected.setdefault(k, len(self._expected))

    def layer_statuses(self, keys: list[tuple]) -> dict:
        """Each layer's status as qemu on the host reports it: ``qemu-img map``
        of the layer alone, opened through a descriptor whose device and
        inode were checked against its pin, with the expected layers after it
        (``expect``), in a few commands run side by side. A layer another
        thread is fetching is waited for, not fetched twice."""
        out, waits, batch = {}, [], []
        with self._lock:
            for k in keys:
                if k in self._statuses:
                    out[k] = self._statuses[k]
                elif k in self._inflight:
                    waits.append((k, self._inflight[k]))
                else:
                    batch.append(k)
            if batch:
                order = list(self._expected)
                at = min((self._expected[k] for k in batch if k in self._expected), default=0)
                for k in order[at:] + order[:at]:
                    if len(batch) >= BATCH:
                        break
                    if k not in self._statuses and k not in self._inflight and k not in batch:
                        batch.append(k)
                done = threading.Event()
                for k in batch:
                    self._inflight[k] = done
                generation = self.generation
        if batch:
            got: dict = {}
            try:
                chunks = [batch[i:i + CHUNK] for i in range(0, len(batch), CHUNK)]
                with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
                    for part in pool.map(self._fetch_statuses, chunks):
                        got.update(part)
            finally:
                with self._lock:
                    for k in batch:
                        self._inflight.pop(k, None)
                        if k in got and generation == self.generation:
                            self._statuses[k] = got[k]
                done.set()
            out.update({k: got.get(k) for k in keys if k in batch})
        for k, ev in waits:
            ev.wait(COMMAND_TIMEOUT)
            with self._lock:
                out[k] = self._statuses.get(k)
        return out

    def _fetch_statuses(self, keys: list[tuple]) -> dict:
        out: dict = {k: None for k in keys}
        asked = [k for k in keys if k[1] in ("qcow2", "raw") and k[2] is not None]
        if not asked:
            return out
        args = []
        for path, fmt, pin in asked:
            node = {"driver": fmt, "file": {"driver": "file", "filename": "/dev/fd/3"}}
            if fmt == "qcow2":
                node["backing"] = None
            args += [path, f"{pin[0]}:{pin[1]}", "json:" + json.dumps(node)]
        try:
            text = self.run(_SCRIPT_MAPS, *args)
        except OSError as e:
            log.debug("block status on %s: asking qemu (%s)", self.name, e.strerror)
            return {}  # not kept: asked again next time
        for key, answer in zip(asked, text.split(b"\0"), strict=False):
            if not answer.startswith(b"OK"):
                log.debug("block status of %s on %s: asking qemu (%s)", key[0], self.name,
                          answer[3:].decode(errors="replace").strip())
                continue
            try:
                out[key] = status.from_qemu_map(json.loads(answer[2:]))
            except (ValueError, KeyError, TypeError, status.NotPlain) as e:
                log.debug("block status of %s on %s: asking qemu (%s)", key[0], self.name, e)
        return out

    def nbd_server(self, spec, rundir: str, ident: int, connections: int):
        from ..nbd.remote import RemoteQemuNBD
        return RemoteQemuNBD(self, spec, rundir, ident, connections)

    async def claim_session(self, what: str, timeout: float) -> None:
        """One of the sessions kept for long-lived processes (``SERVER_SESSIONS``):
        a qemu-nbd, a qemu-io. Waits ``timeout`` seconds for one to free;
        Unavailable after."""
        with trio.move_on_after(timeout):
            while self.servers >= self.server_sessions:
                await trio.sleep(0.05)
        if self.servers >= self.server_sessions:
            raise Unavailable(f"{self.server_sessions} qemu-nbd and qemu-io already run on {self.name} for this "
                              f"mount (one ssh session each, and sshd's MaxSessions is 10 by default): {what} "
                              "waits for one to end: close files and retry")
        self.servers += 1

    def release_session(self) -> None:
        self.servers -= 1

    def qemu_io(self) -> list[str]:
        """A qemu-io on the host, reading commands from this side. Its stderr
        joins its stdout there: ssh carries the two apart, and its messages
        must stay in order with its prompts (``nbd.heads``)."""
        return self.command("exec stdbuf -i0 qemu-io 2>&1")

    def reach_socket(self, path: str) -> str:
        """A UNIX socket on the host (a backup job's NBD server), forwarded to
        one here through the master connection (once per path)."""
        with self._lock:
            here = self._forwards.get(path)
        if here is not None:
            return here
        if not self.connected:
            raise OSError(errno.ENOTCONN, f"{self.name} is not connected: {self.error or 'connection lost'}")
        here = os.path.join(self.rundir, f"fwd{self.ident}-{len(self._forwards)}.sock")
        if os.path.lexists(here):
            os.unlink(here)
        p = subprocess.run(self.client("-O", "forward", "-L", f"{here}:{path}"), capture_output=True, timeout=30)
        if p.returncode:
            raise OSError(errno.ENOTCONN, f"{self.name}: cannot forward {path}: "
                                          f"{p.stderr.decode(errors='replace').strip()}")
        with self._lock:
            self._forwards[path] = here
        return here

    def connect(self, socket: str, contexts: tuple[str, ...], export: str):
        from ..nbd.client import Connection
        return Connection(socket, contexts, export)


def _above(root: str) -> list[str]:
    out, d = [], os.path.dirname(root)
    while True:
        out.append(d)
        if d == "/":
            return out
        d = os.path.dirname(d)


class RemoteFile:
    """A remote file open for reading headers (``read``, ``seek``, ``tell``)."""

    def __init__(self, host: SshHost, path: str, size: int, head: bytes | None):
        self.host, self.path, self.size = host, path, size
        self.head = head or b""
        self.pos = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset if whence == os.SEEK_SET else self.pos + offset if whence == os.SEEK_CUR \
            else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(0, self.size - self.pos)
        if self.pos + n <= len(self.head):
            out = self.head[self.pos:self.pos + n]
        elif self.pos >= self.size:
            out = b""
        else:
            out = self.host.read_at(self.path, self.pos, min(n, max(0, self.size - self.pos)))
        self.pos += len(out)
        return out

    def fileno(self):
        raise OSError(errno.EBADF, "a remote file has no descriptor")
