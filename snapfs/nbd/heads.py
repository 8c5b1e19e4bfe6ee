"""The first bytes of images, read by long-lived ``qemu-io`` processes.

Whether a chain view has a partition table to list (``fs/partitions.py``)
is decided by its first kilobyte: every label sfdisk reads carries its magic
there. Starting a qemu-nbd to read 1 KiB costs a process, an image open and
a connection; a first ``ls -lR`` of a repository would pay it for every
point. One ``qemu-io`` per host instead (two at most, started on first use,
kept until the mount ends) opens image after image on command: ``open -r``,
``read -v``, ``close``, about a millisecond in all. qemu still reads every
byte; this module only carries its hexdump back.

The images are named as qemu-nbd is given them (``formats.json_node``),
respelled so that qemu-io's command line, which splits at spaces, keeps the
name whole. qemu-io answers each command and then prints its prompt; both of
its streams go into one pipe, so a command's messages are the lines between
two prompts. A prompt counts only at the start of a line: the hexdump's
text column shows the disk's own bytes, and a guest can write a prompt
there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess

import trio

log = logging.getLogger(__name__)

PROMPT = b"qemu-io> "
WORKERS = 2  # qemu-io processes per host
TIMEOUT = 30.0  # for one image's answer
_DUMP = re.compile(rb"([0-9a-f]{8}):  ((?:[0-9a-f]{2} ){16})")


class HeadError(Exception):
    """The bytes could not be read; the reason, as qemu gave it."""


def command_name(json_filename: str) -> str:
    """``json_filename`` as one word of qemu-io's command line (no space in it)."""
    node = json.loads(json_filename.removeprefix("json:"))
    return "json:" + json.dumps(node, separators=(",", ":")).replace(" ", "\\u0020")


class QemuIO:
    """One qemu-io process, one request at a time."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: trio.Process | None = None
        self._buf = b""
        self.answered = False  # the last request was answered whole

    async def start(self) -> None:
        env = dict(os.environ, LC_ALL="C")
        self.proc = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        await self._answers(1)  # the first prompt

    async def _answers(self, n: int) -> list[list[bytes]]:
        """The lines printed before each of the next ``n`` prompts."""
        out: list[list[bytes]] = [[]]
        while True:
            while self._buf:
                if self._buf.startswith(PROMPT):
                    self._buf = self._buf[len(PROMPT):]
                    if len(out) == n:
                        return out
                    out.append([])
                    continue
                if len(self._buf) < len(PROMPT) and PROMPT.startswith(self._buf):
                    break  # a prompt, not whole yet
                end = self._buf.find(b"\n")
                if end < 0:
                    break
                out[-1].append(self._buf[:end])
                self._buf = self._buf[end + 1:]
            chunk = await self.proc.stdout.receive_some(1 << 16)
            if not chunk:
                said = b" ".join(line for part in out for line in part) + self._buf
                raise HeadError(f"qemu-io exited: {said.decode(errors='replace').strip() or 'no reason given'}")
            self._buf += chunk

    async def _ask(self, command: str) -> list[bytes]:
        await self.proc.stdin.send_all(command.encode() + b"\n")
        return (await self._answers(1))[0]

    async def read(self, name: str, length: int) -> bytes:
        """The first ``length`` bytes (a multiple of 16) of the image ``name``."""
        self.answered = False
        # One command at a time: qemu-io reads what it was sent at once but
        # runs one line of it, and the next only when more arrives.
        opened = await self._ask(f"open -r {name}")
        read = await self._ask(f"read -v 0 {length}")
        await self._ask("close")
        self.answered = True
        data = bytearray()
        for line in read:
            m = _DUMP.match(line)
            if m is not None and int(m.group(1), 16) == len(data):
                data += bytes.fromhex(m.group(2).decode())
        if f"read {length}/{length} bytes at offset 0".encode() in read and len(data) == length:
            return bytes(data)
        said = " ".join(line.decode(errors="replace").removeprefix("qemu-io: ")
                        for line in (opened or read) if not _DUMP.match(line)).strip()
        if said.startswith("can't open device json:") and "}: " in said:
            said = said[said.index("}: ") + 3:]  # snapfs's own spelling of the image: qemu's reason after it
        raise HeadError(said or "qemu-io read nothing")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class Heads:
    """qemu-io processes of one host (``argv`` starts one), shared by the mount."""

    def __init__(self, argv: list[str], workers: int = WORKERS):
        self.argv = argv
        self._slots = trio.Semaphore(workers)
        self._idle: list[QemuIO] = []
        self.procs: list[QemuIO] = []

    async def read(self, json_filename: str, length: int) -> bytes:
        """The first ``length`` bytes of the image qemu opens by ``json_filename``."""
        name = command_name(json_filename)
        async with self._slots:
            q = self._idle.pop() if self._idle else None
            try:
                with trio.fail_after(TIMEOUT):
                    if q is None:
                        q = QemuIO(self.argv)
                        self.procs.append(q)
                        await q.start()
                    data = await q.read(name, length)
            except HeadError:
                if q.proc is not None and q.proc.returncode is None and q.answered:
                    self._idle.append(q)  # it answered: the image was at fault
                else:
                    self._drop(q)
                raise
            except BaseException as e:
                # No answer in time, or cancelled mid-answer: its stream is out of step.
                if q is not None:
                    self._drop(q)
                if isinstance(e, trio.TooSlowError):
                    raise HeadError(f"no answer from qemu-io within {TIMEOUT:.0f} s") from None
                if isinstance(e, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                    raise HeadError(f"qemu-io cannot be run: {e}") from None
                raise
            self._idle.append(q)
            return data

    def _drop(self, q: QemuIO) -> None:
        q.kill()
        if q in self.procs:
            self.procs.remove(q)

    def close(self) -> None:
        for q in self.procs:
            q.kill()
        self.procs.clear()
        self._idle.clear()
