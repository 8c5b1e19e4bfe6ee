"""One qemu-nbd process serving one export over a UNIX socket.

The image is always handed to qemu-nbd as a ``json:`` filename that spells
out every node (``formats.json_node``). Servers are read-only without
force-share, so an image a running VM writes cannot be opened ("in use"),
while the backing layers of a running VM open fine.

A writable server (``--rw`` mounts) writes the top layer in its own format:
``--discard=unmap`` so a trim or zero request reaches the image instead of
being dropped, ``--detect-zeroes=on`` so a buffer of zeros becomes zero
clusters (allocated zeros) rather than clusters full of zeros. qemu's image
locking lets one writer in, and no reader beside it.

qemu-nbd runs without ``--persistent``: it exits by itself once its last
client disconnects, so even a snapfs killed with SIGKILL leaves no server
behind once the kernel has closed its sockets.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess

import trio

from ..errors import ImageRefused, Unavailable
from ..formats import check_pinned
from .spec import ExportSpec

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 1.0
HANGUP_WAIT = 0.2  # for qemu-nbd to say why it dropped a connection


def _reason_from_stderr(text: str, what: str = "the image") -> Unavailable:
    msg = " ".join(line.strip() for line in text.strip().splitlines()[-3:]) or "qemu-nbd failed"
    msg = msg.removeprefix("qemu-nbd: ")
    if msg.startswith("Failed to blk_new_open 'json:"):
        # The json: filename is snapfs's own spelling of the chain: qemu's
        # reason after it is what users need.
        cut = msg.find("': ")
        if cut != -1:
            msg = f"qemu cannot open {what}: {msg[cut + 3:]}"
    if "lock" in msg.lower():
        return Unavailable(f"in use: {msg}", errno.EBUSY)
    return Unavailable(msg)


# qemu-nbd allocates a buffer for every read it serves (2 MiB for snapfs's
# chunks). glibc serves each allocation above 128 KiB with a fresh mmap(), so
# every request page-faults and zeroes its buffer anew: that was more than
# half of qemu-nbd's CPU during a copy (0.85 s per GiB read; about 0.4 s
# with these glibc tunables, which keep the buffers on the heap as
# chunks.tune_malloc does for snapfs itself; make bench prints both).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"


def _environ() -> dict[str, str]:
    env = dict(os.environ)
    given = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{given}:{MALLOC_TUNABLES}" if given else MALLOC_TUNABLES
    return env


class QemuNBD:
    """One qemu-nbd process serving one export over a UNIX socket."""

    def __init__(self, spec: ExportSpec, rundir: str, ident: int, connections: int):
        self.spec = spec
        self.socket = os.path.join(rundir, f"{ident}.sock")
        self.pidfile = os.path.join(rundir, f"{ident}.pid")
        self.errfile = os.path.join(rundir, f"{ident}.err")
        self.connections = connections
        self.proc: trio.Process | None = None
        self.serving = False  # it listened: a failure from now on is news
        self.hangups = 0  # its "Disconnect client" lines already told (``hung_up``)

    def command(self) -> list[str]:
        # The worker threads' connections, the small reads' one (``AioConnection``) and a spare.
        cmd = ["qemu-nbd", f"--shared={self.connections + 2}",
               f"--socket={self.socket}", f"--pid-file={self.pidfile}", "--cache=writeback"]
        if self.spec.writable:
            cmd += ["--discard=unmap", "--detect-zeroes=on"]
        else:
            cmd.insert(1, "--read-only")
        if self.spec.allocation_depth:
            cmd.append("--allocation-depth")
        if self.spec.bitmap is not None:
            cmd.append(f"--bitmap={self.spec.bitmap}")
        if self.spec.snapshot is not None:
            # An option string: a comma in the name is written twice.
            cmd.append("--load-snapshot=snapshot.name=" + self.spec.snapshot.replace(",", ",,"))
        cmd.append(self.spec.json_filename())
        return cmd

    def _check_pins(self) -> None:
        """Every layer is still the file scanned, reached without a symlink."""
        ctimes = self.spec.ctimes or (None,) * len(self.spec.layers)
        for (path, _), pin, ctime in zip(self.spec.layers, self.spec.pins, ctimes, strict=True):
            if pin is None:
                continue
            try:
                st = check_pinned(path, pin)
            except OSError as e:
                raise Unavailable(f"{path} was replaced since the mount was made (remount to see "
                                  f"it): {e.strerror}", errno.ESTALE) from None
            if ctime is not None and st.st_ctime_ns != ctime:
                raise Unavailable(f"{path} changed since the mount was made, and qemu would follow "
                                  "its header (snapfs refresh MOUNTPOINT, or remount)", errno.ESTALE)

    def _opened_files(self) -> dict[tuple[int, int], tuple[str, int]]:
        """``(st_dev, st_ino)`` of every regular file and block device the running
        qemu-nbd holds open (but its own pid and error files), with its path
        and st_ctime_ns."""
        out = {}
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return out
        own = set()
        for p in (self.pidfile, self.errfile):
            try:
                st = os.stat(p)
                own.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        for name in names:
            link = os.path.join(fd_dir, name)
            try:
                st = os.stat(link)
                target = os.readlink(link)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)) and key not in own:
                out[key] = (target, st.st_ctime_ns)
        return out

    async def start(self) -> None:
        for p in (self.socket, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        # What qemu reads must be what was scanned (docs/views.md, "Safety"):
        # each layer is checked before qemu opens it, and what qemu opened
        # is checked before any client reads from it (the path could change
        # in between).
        self._check_pins()
        cmd = self.command()
        log.debug("starting %s", cmd)
        with open(self.errfile, "wb") as err:
            self.proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=_environ())
        # qemu-nbd writes its pid file once it listens; the socket file
        # appears earlier, at bind().
        delay = 0.001
        with trio.move_on_after(START_TIMEOUT) as timeout:
            while not os.path.exists(self.pidfile):
                if self.proc.poll() is not None:
                    e = self.failure()
                    # It said why it stopped: qemu's verdict on the image.
                    raise ImageRefused(e.reason, e.errno) if e.reason != "qemu-nbd failed" else e
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
        if timeout.cancelled_caught:
            raise await self._start_timed_out("qemu-nbd")
        await self._check_opened(self._opened_files())
        self.serving = True
        log.debug("qemu-nbd pid %d serves %s", self.proc.pid, self.spec.describe())

    async def _start_timed_out(self, what: str) -> Unavailable:
        """Stop a server that did not start within START_TIMEOUT; the error to raise."""
        said = self.failure().reason
        await self.stop()
        return Unavailable(f"{what} did not start within {START_TIMEOUT:.0f} s opening "
                           f"{len(self.spec.layers)} layer(s), {self.spec.describe()}"
                           + ("" if said == "qemu-nbd failed" else f" (it said: {said})"))

    async def _check_opened(self, opened: dict[tuple[int, int], tuple[str, int]]) -> None:
        """What the started qemu-nbd opened (``_opened_files``) is exactly the
        files scanned: none missing (one was replaced), none more, and, when
        qemu followed the headers itself, none changed since the scan (a
        header rewritten in place). Else it is stopped: ESTALE."""
        pins = {p for p in self.spec.pins if p is not None}
        extra = sorted(path for key, (path, _) in opened.items() if key not in pins) \
            if None not in self.spec.pins else []
        if self.spec.ctimes:
            extra += sorted(f"{opened[pin][0]} (changed)" for pin, ctime in zip(
                self.spec.pins, self.spec.ctimes, strict=True) if pin in opened and opened[pin][1] != ctime)
        if pins - opened.keys() or extra:
            await self.stop()
            raise Unavailable("an image was replaced since the mount was made (remount to see it): "
                              + self.spec.describe() + (f"; qemu opened {extra[0]}" if extra else ""),
                              errno.ESTALE)

    def failure(self) -> Unavailable:
        try:
            with open(self.errfile, errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        return _reason_from_stderr(text, self.spec.describe())

    def _exit_status(self) -> int | None:
        """The process's return code: negative for a signal, as subprocess says."""
        return self.proc.returncode if self.proc is not None else None

    def ended(self) -> str:
        """How the process ended, with what it said, for messages."""
        rc = self._exit_status()
        how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with status {rc}"
        said = self.failure().reason
        return how if said == "qemu-nbd failed" else f"{how} ({said})"

    async def hung_up(self) -> str | None:
        """Why it hung up on a client ("Disconnect client, due to: ..." on its
        stderr), for the first request to ask after it did; None if it did not
        (killed, or dropped the connection without a word). qemu-nbd writes
        why a moment after the connection is gone."""
        with trio.move_on_after(HANGUP_WAIT):
            while True:
                try:
                    with open(self.errfile, errors="replace") as f:
                        lines = [line for line in f if "Disconnect client, due to: " in line]
                except OSError:
                    return None  # stopped meanwhile
                if len(lines) > self.hangups:
                    self.hangups = len(lines)
                    return lines[-1].split("Disconnect client, due to: ", 1)[1].strip()
                rc = self.proc.poll() if self.proc is not None else -1
                if rc is not None and rc < 0:
                    return None  # killed: it says nothing
                await trio.sleep(0.005)
        return None

    def kill(self) -> None:
        """SIGKILL it (hung: it did not answer); ``stop`` reaps it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        """Wait, terminate, kill; log what the server said if it failed.

        Callers close their connections first, and a non-persistent qemu-nbd
        then exits by itself. SIGTERM comes second: qemu-nbd loses one that
        arrives while it is still starting.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                if sig == signal.SIGKILL:
                    log.warning("qemu-nbd pid %d ignored SIGTERM, killing it", proc.pid)
                if sig is not None:
                    proc.send_signal(sig)
                with trio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
            # A server that never listened failed with the error its start
            # raised (the view's reason): logged there, not twice.
            if proc.returncode not in (0, -signal.SIGTERM) and self.serving:
                log.warning("qemu-nbd for %s exited with %s: %s", self.spec.describe(),
                            proc.returncode, self.failure().reason)
        for p in (self.socket, self.pidfile, self.errfile):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _is_our_qemu_nbd(pid: int, rundir: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and os.path.basename(cmd[0]) == b"qemu-nbd" and any(
        a.startswith(b"--socket=" + os.fsencode(rundir)) for a in cmd)


def stop_leftovers(rundir: str) -> None:
    """SIGTERM the qemu-nbd whose pid files a dead mount left in ``rundir``.

    Only processes that really are qemu-nbd serving a socket in ``rundir``:
    a pid file may be stale, and its pid reused by anything.
    """
    try:
        names = os.listdir(rundir)
    except OSError:
        return
    for name in names:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(rundir, name)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _is_our_qemu_nbd(pid, rundir):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
