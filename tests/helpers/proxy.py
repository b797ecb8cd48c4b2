"""A loopback TCP proxy that counts the bytes crossing it: a real measurement of what a client
downloads, whatever code path (cat_file, open().read(), ...) it takes."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self


class LoopbackProxy:
    """A listener on 127.0.0.1:<port> for a proxy to ``target``: start/stop as a context manager;
    each accepted client connection is handed to :meth:`handle` on its own thread."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=type(self).__name__)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()

    def handle(self, client: socket.socket) -> None:
        raise NotImplementedError


class CountingProxy(LoopbackProxy):
    """Forward 127.0.0.1:<port> to `target` and count bytes in each direction."""

    def __init__(self, target_host: str, target_port: int):
        super().__init__(target_host, target_port)
        self.bytes_down = 0  # server -> client
        self.bytes_up = 0  # client -> server

    def reset(self) -> None:
        with self._lock:
            self.bytes_down = self.bytes_up = 0

    def handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        for src, dst, down in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
