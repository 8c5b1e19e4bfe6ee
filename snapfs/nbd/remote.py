"""qemu-nbd on a host reached through ssh (``hosts/ssh.py``).

One ssh session per server runs a small POSIX shell wrapper on the host:

1. it checks every layer's pin as ``formats.check_pinned`` does here (no
   symlink on the way, the device and inode scanned, the ctime where qemu
   follows headers), so a file swapped since the scan is never opened;
2. starts qemu-nbd on a UNIX socket in the connection's directory on the
   host, says its pid, waits until it listens, and lists the files it holds
   open (device, inode, ctime, path) for the same check as a local server;
3. then waits on the session's standard input: when the session ends (snapfs
   stops the server, the ssh connection is closed or lost, snapfs is killed),
   it kills qemu-nbd. No qemu-nbd outlives its session.

qemu-nbd's stderr is the session's, so the server's reasons and its
"Disconnect client" lines land in the same error file as a local server's.
The socket is forwarded to a local one through the master connection
(``ssh -O forward -L``): libnbd connects here as it does to a local server,
no TCP port is opened on the host.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess

import trio

from ..errors import ImageRefused, Unavailable
from .qemu import MALLOC_TUNABLES, START_TIMEOUT, STOP_TIMEOUT, QemuNBD

log = logging.getLogger(__name__)

PIN_FAILED = 112  # the wrapper's exit status when a layer is not the file scanned

WRAPPER = r"""
pidfile=$1 n=$2; shift 2
while [ "$n" -gt 0 ]; do
    p=$1 pin=$2 ct=$3; shift 3; n=$((n - 1))
    d=$p
    while [ "$d" != / ] && [ -n "$d" ]; do
        if [ -L "$d" ]; then printf 'snapfs: %s: a symlink on the way
' "$p" >&2; exit 112; fi
        d=${d%/*}
    done
    got=$(stat -c '%d:%i:%.9Z' -- "$p" 2>/dev/null) || { printf 'snapfs: %s: gone
' "$p" >&2; exit 112; }
    case $got in "$pin":*) ;; *) printf 'snapfs: %s: not the file scanned
' "$p" >&2; exit 112 ;; esac
    if [ "$ct" != - ] && [ "${got##*:}" != "$ct" ]; then
        printf 'snapfs: %s: changed since the scan
' "$p" >&2; exit 112
    fi
done
exec 3<&0
"$@" </dev/null >/dev/null 3<&- &
q=$!
# From here on the session's end (stdin at EOF) kills qemu-nbd, whatever this
# shell is doing, and so does this shell's own end (a write to a closed session).
( read -r x <&3; kill "$q" 2>/dev/null; sleep 1; kill -9 "$q" 2>/dev/null ) >/dev/null 2>&1 </dev/null &
w=$!
exec 3<&-
trap 'kill "$q" 2>/dev/null; exit 1' PIPE HUP TERM
printf 'pid %s\0' "$q"
while [ ! -s "$pidfile" ]; do
    if ! kill -0 "$q" 2>/dev/null; then wait "$q"; s=$?; kill "$w" 2>/dev/null; exit $s; fi
    sleep 0.01
done
own=$(stat -c '%d:%i' -- "$pidfile")
for f in /proc/$q/fd/*; do
    s=$(stat -L -c '%d:%i:%.9Z:%f' -- "$f" 2>/dev/null) || continue
    case $s in "$own":*) continue ;; esac
    printf 'fd %s\0' "$s"
    readlink -z -- "$f" || printf '\0'
done
printf 'ready\0'
wait "$q"
s=$?
kill "$w" 2>/dev/null  # qemu-nbd is gone: its pid must not be killed again
exit $s
"""


class RemoteQemuNBD(QemuNBD):
    """qemu-nbd on ``host``, its socket forwarded here."""

    def __init__(self, host, spec, rundir: str, ident: int, connections: int):
        super().__init__(spec, rundir, ident, connections)
        self.host = host
        self.remote_socket = f"{host.remote_dir}/{ident}.sock"
        self.remote_pidfile = f"{host.remote_dir}/{ident}.pid"
        self.opened: dict[tuple[int, int], tuple[str, int]] = {}
        self.forwarded = False
        self.session = False  # holds one of the host's server_sessions

    def command(self) -> list[str]:
        out = []
        for a in super().command():
            if a.startswith("--socket="):
                a = f"--socket={self.remote_socket}"
            elif a.startswith("--pid-file="):
                a = f"--pid-file={self.remote_pidfile}"
            out.append(a)
        return ["env", f"GLIBC_TUNABLES={MALLOC_TUNABLES}", *out]

    def _wrapper_args(self) -> list[str]:
        ctimes = self.spec.ctimes or (None,) * len(self.spec.layers)
        checks = [(path, pin, ctime) for (path, _), pin, ctime in zip(self.spec.layers, self.spec.pins, ctimes,
                                                                        strict=True) if pin is not None]
        args = [self.remote_pidfile, str(len(checks))]
        for path, pin, ctime in checks:
            args += [path, f"{pin[0]}:{pin[1]}", "-" if ctime is None else f"{ctime // 10**9}.{ctime % 10**9:09d}"]
        return args + self.command()

    def _opened_files(self) -> dict[tuple[int, int], tuple[str, int]]:
        return self.opened

    async def start(self) -> None:
        if self.host.remote_dir is None or not self.host.connected:
            raise Unavailable(f"{self.host.name} is not connected: {self.host.error or 'connection lost'}")
        for p in (self.socket, self.errfile):
            if os.path.lexists(p):
                os.unlink(p)
        # One ssh session per server, and sshd serves few per connection.
        await self.host.claim_session("qemu-nbd", START_TIMEOUT)
        self.session = True
        cmd = self.host.command(WRAPPER, *self._wrapper_args())
        log.debug("starting on %s: %s", self.host.name, self.command())
        with open(self.errfile, "wb") as err:
            self.proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                         stderr=err)
        out = b""
        with trio.move_on_after(START_TIMEOUT) as timeout:
            while not _ready(out):
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    await self.proc.wait()
                    e = self.failure()
                    if self.proc.returncode == PIN_FAILED:
                        raise Unavailable(f"an image was replaced since the mount was made (remount to see it): "
                                          f"{e.reason.removeprefix('snapfs: ')}", errno.ESTALE)
                    if self.proc.returncode == 255:
                        raise Unavailable(f"{self.host.name}: {e.reason}")
                    raise ImageRefused(e.reason, e.errno) if e.reason != "qemu-nbd failed" else e
                out += chunk
        if timeout.cancelled_caught:
            raise await self._start_timed_out(f"qemu-nbd on {self.host.name}")
        self.opened = _parse_opened(out)
        await self._check_opened(self.opened)
        await trio.to_thread.run_sync(self._forward)
        self.serving = True
        log.debug("qemu-nbd on %s serves %s", self.host.name, self.spec.describe())

    def _forward(self) -> None:
        p = subprocess.run(self.host.client("-O", "forward", "-L", f"{self.socket}:{self.remote_socket}"),
                           capture_output=True, timeout=30)
        if p.returncode:
            raise Unavailable(f"{self.host.name}: cannot forward qemu-nbd's socket: "
                              f"{p.stderr.decode(errors='replace').strip()}")
        self.forwarded = True

    def _unforward(self) -> None:
        if self.forwarded and self.host.connected:
            subprocess.run(self.host.client("-O", "cancel", "-L", f"{self.socket}:{self.remote_socket}"),
                           capture_output=True, timeout=10)
        self.forwarded = False

    def _exit_status(self) -> int | None:
        """The wrapper's status is its ``wait``'s: 128 + the signal that ended qemu-nbd."""
        rc = super()._exit_status()
        return -(rc - 128) if rc is not None and 128 < rc < 255 else rc

    def _end_session(self) -> None:
        if self.session:
            self.session = False
            self.host.release_session()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            self._end_session()
            return
        with trio.CancelScope(shield=True):
            if self.forwarded:
                await trio.to_thread.run_sync(self._unforward)
            if proc.stdin is not None:
                await proc.stdin.aclose()  # the wrapper kills qemu-nbd
            with trio.move_on_after(STOP_TIMEOUT + 1.5):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
            if proc.returncode not in (0, 143, -15, 255) and self.serving:
                log.warning("qemu-nbd on %s for %s exited with %s: %s", self.host.name, self.spec.describe(),
                            proc.returncode, self.failure().reason)
            self._end_session()
        for p in (self.socket, self.errfile):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _records(out: bytes) -> list[tuple[bytes, bytes | None]]:
    """The wrapper's NUL-terminated records: ``pid N``, ``fd DEV:INO:CTIME:MODE``
    followed by the file's path, ``ready``; a path is never taken for a record."""
    parts = out.split(b"\0")[:-1]  # what follows the last NUL is not complete yet
    recs, i = [], 0
    while i < len(parts):
        if parts[i].startswith(b"fd "):
            recs.append((parts[i], parts[i + 1] if i + 1 < len(parts) else None))
            i += 2
        else:
            recs.append((parts[i], None))
            i += 1
    return recs


def _ready(out: bytes) -> bool:
    return any(rec == b"ready" for rec, _ in _records(out))


def _parse_opened(out: bytes) -> dict[tuple[int, int], tuple[str, int]]:
    """``(st_dev, st_ino)`` -> (path, st_ctime_ns) of the regular files and block
    devices qemu-nbd holds open, from the wrapper's records."""
    opened = {}
    for rec, path in _records(out):
        if rec == b"ready":
            break
        if not rec.startswith(b"fd ") or path is None:
            continue
        dev, ino, ctime, mode = rec[3:].split(b":", 3)
        if stat.S_ISREG(int(mode, 16)) or stat.S_ISBLK(int(mode, 16)):
            sec, _, frac = ctime.partition(b".")
            opened[(int(dev), int(ino))] = (os.fsdecode(path), int(sec) * 10**9 + int((frac + b"000000000")[:9]))
    return opened
