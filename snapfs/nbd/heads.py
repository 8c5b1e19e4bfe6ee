"""The first bytes of images, read by long-lived ``qemu-io`` processes.

Whether a chain view has a partition table to list (``fs/partitions.py``)
is decided by its first kilobyte: every label sfdisk reads carries its magic
there. Starting a qemu-nbd to read 1 KiB costs a process, an image open and
a connection; a first ``ls -lR`` of a repository would pay it for every
point. One ``qemu-io`` per host instead (two at most, started on first use,
ended 2 s after their last read) opens image after image on command: ``open -r``,
``read -v``, ``close``, about a millisecond in all. qemu still reads every
byte; this module only carries its hexdump back.

The images are named as qemu-nbd is given them (``formats.json_node``),
respelled so that qemu-io's command line, which splits at spaces, keeps the
name whole; a name too long for that line is not read here (the caller
then asks sfdisk). Both of qemu-io's streams go into one pipe, and each
command's answer ends at a marker of ours (``QemuIO``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess

import trio

from ..errors import SnapfsError

log = logging.getLogger(__name__)

PROMPT = b"qemu-io> "
WORKERS = 2  # qemu-io processes per host
TIMEOUT = 30.0  # for one image's answer
_DUMP = re.compile(rb"([0-9a-f]{8}):  ((?:[0-9a-f]{2} ){16})")
# qemu-io reads a command line into 1024 bytes: a longer one would run as two.
MAX_COMMAND = 1000


class HeadError(Exception):
    """The bytes could not be read; the reason, as qemu gave it."""


class OutOfStep(HeadError):
    """The process is gone or its answers can no longer be told apart."""


def _mark() -> str:
    return "snapfs-" + secrets.token_hex(8)


def command_name(json_filename: str) -> str:
    """``json_filename`` as one word of qemu-io's command line (no space in it)."""
    node = json.loads(json_filename.removeprefix("json:"))
    return "json:" + json.dumps(node, separators=(",", ":")).replace(" ", "\\u0020")


class QemuIO:
    """One qemu-io process, one request at a time.

    ``argv`` runs it with its stdin unbuffered (``stdbuf -i0``): qemu-io
    reads stdin through stdio, and a buffered stdin would swallow every line
    sent at once but the first until more arrives. Unbuffered, a request is
    sent whole (one round trip, which counts over ssh)::

        open -r NAME
        snapfs-NONCE1        a command qemu-io does not know
        read -v 0 LENGTH
        close
        snapfs-NONCE2

    Its answers end at the "command "snapfs-NONCE" not found" lines, which
    nothing printed before them can forge: neither the disk's bytes (in the
    hexdump's text column) nor an image's name (in an error message, where a
    name may hold newlines and prompts) held the nonces, made afresh for each
    request. What came before the first is the open's answer (nothing when
    it opened), the read's comes between the two, and holds no name.
    """

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: trio.Process | None = None
        self.session = False  # holds one of its host's sessions (``Heads``)
        self._buf = b""

    async def start(self) -> None:
        env = dict(os.environ, LC_ALL="C")
        self.proc = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        mark = _mark()
        await self.proc.stdin.send_all(mark.encode() + b"\n")
        await self._until(mark)

    async def _until(self, mark: str) -> list[bytes]:
        """The lines printed up to qemu-io's answer to the command ``mark``
        (prompts left out), and that answer's prompt."""
        done = f'command "{mark}" not found'.encode()
        lines: list[bytes] = []
        while True:
            while self._buf:
                if self._buf.startswith(PROMPT):
                    self._buf = self._buf[len(PROMPT):]
                    if lines and lines[-1] == done:
                        return lines[:-1]
                    continue
                if len(self._buf) < len(PROMPT) and PROMPT.startswith(self._buf):
                    break  # a prompt, not whole yet
                end = self._buf.find(b"\n")
                if end < 0:
                    break
                lines.append(self._buf[:end])
                self._buf = self._buf[end + 1:]
            chunk = await self.proc.stdout.receive_some(1 << 16)
            if not chunk:
                said = b" ".join(lines) + self._buf
                raise OutOfStep(f"qemu-io exited: {said.decode(errors='replace').strip() or 'no reason given'}")
            self._buf += chunk

    async def read(self, name: str, length: int) -> bytes:
        """The first ``length`` bytes (a multiple of 16) of the image ``name``."""
        command = f"open -r {name}"
        if len(command) > MAX_COMMAND or "\n" in command:
            raise HeadError(f"the image's name is too long for qemu-io's command line ({len(command)} bytes)")
        opened_mark, read_mark = _mark(), _mark()
        await self.proc.stdin.send_all(
            f"{command}\n{opened_mark}\nread -v 0 {length}\nclose\n{read_mark}\n".encode())
        opened = await self._until(opened_mark)
        read = await self._until(read_mark)
        data = bytearray()
        for line in read:
            m = _DUMP.match(line)
            if m is not None and int(m.group(1), 16) == len(data):
                data += bytes.fromhex(m.group(2).decode())
        if not opened and f"read {length}/{length} bytes at offset 0".encode() in read and len(data) == length:
            return bytes(data)
        said = " ".join(line.decode(errors="replace").removeprefix("qemu-io: ")
                        for line in (opened or read) if not _DUMP.match(line)).strip()
        if said.startswith("can't open device json:") and "}: " in said:
            said = said[said.index("}: ") + 3:]  # snapfs's own spelling of the image: qemu's reason after it
        raise HeadError(said or "qemu-io read nothing")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def end(self) -> None:
        """Kill it and collect its exit (no zombie), within a second."""
        self.kill()
        if self.proc is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.proc.wait()


class Heads:
    """qemu-io processes of one host (``argv`` starts one), shared by the mount.

    host: a host whose long-lived processes each take one of a few sessions
    (``SshHost.claim_session``): each qemu-io takes one, until it ends.
    """

    def __init__(self, argv: list[str], workers: int = WORKERS, host=None):
        self.argv = argv
        self.host = host if hasattr(host, "claim_session") else None
        self._slots = trio.Semaphore(workers)
        self._idle: list[QemuIO] = []
        self.procs: list[QemuIO] = []
        self._last = 0.0  # when the last request ended

    async def expire(self, idle: float) -> None:
        """End the processes once no request came for ``idle`` seconds (their
        sessions go back to the host's servers); runs until cancelled."""
        while True:
            await trio.sleep(idle)
            if self._idle and len(self._idle) == len(self.procs) and trio.current_time() - self._last >= idle:
                # Out of both lists before any wait: a read meanwhile starts a new one.
                ending, self._idle = self._idle, []
                for q in ending:
                    self.procs.remove(q)
                for q in ending:
                    await self._drop(q)

    async def read(self, json_filename: str, length: int) -> bytes:
        """The first ``length`` bytes of the image qemu opens by ``json_filename``."""
        name = command_name(json_filename)
        async with self._slots:
            q = self._idle.pop() if self._idle else None
            if q is None:
                if self.host is not None:
                    # No waiting for a session: without one, sfdisk decides at once.
                    try:
                        await self.host.claim_session("qemu-io", 0)
                    except SnapfsError as e:
                        raise HeadError(str(e)) from None
                q = QemuIO(self.argv)
                q.session = self.host is not None
                self.procs.append(q)
            try:
                with trio.fail_after(TIMEOUT):
                    if q.proc is None:
                        await q.start()
                    data = await q.read(name, length)
            except OutOfStep:
                await self._drop(q)
                raise
            except HeadError:
                self._idle.append(q)  # it answered: the image was at fault
                raise
            except BaseException as e:
                # No answer in time, or cancelled mid-answer: its stream is out of step.
                await self._drop(q)
                if isinstance(e, trio.TooSlowError):
                    raise HeadError(f"no answer from qemu-io within {TIMEOUT:.0f} s") from None
                if isinstance(e, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                    raise HeadError(f"qemu-io cannot be run: {e}") from None
                raise
            self._idle.append(q)
            self._last = trio.current_time()
            return data

    async def _drop(self, q: QemuIO) -> None:
        if q in self.procs:
            self.procs.remove(q)
        await q.end()
        self._end_session(q)

    def _end_session(self, q: QemuIO) -> None:
        if q.session:
            q.session = False
            self.host.release_session()

    def close(self) -> None:
        for q in self.procs:
            q.kill()
            self._end_session(q)
        self.procs.clear()
        self._idle.clear()
