"""A TCP relay that adds latency: this kernel has no netem qdisc.

``Relay(target_port, delay)`` listens on 127.0.0.1 (``.port``) and forwards
every connection to ``127.0.0.1:target_port``, holding each chunk ``delay``
seconds in each direction. Chunks queue with the time they are due, so the
link keeps its throughput (many chunks in flight) and only gains latency,
as a long network path would. ``stop()`` closes everything.
"""

from __future__ import annotations

import collections
import socket
import threading
import time


class Relay:
    def __init__(self, target_port: int, delay: float):
        self.target = ("127.0.0.1", target_port)
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stopped = False
        self.flowing = threading.Event()
        self.flowing.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                _Pipe(a, b, self.delay, self.flowing)

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class _Pipe:
    """One direction: read as fast as data comes, send each chunk once it is due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, flowing: threading.Event):
        self.src, self.dst, self.delay, self.flowing = src, dst, delay, flowing
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.done = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(1 << 20)
            except OSError:
                data = b""
            with self.cond:
                self.queue.append((time.monotonic() + self.delay, data))
                self.cond.notify()
            if not data:
                return

    def _send(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                due, data = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.flowing.wait()
            if not data:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                self.dst.sendall(data)
            except OSError:
                return
