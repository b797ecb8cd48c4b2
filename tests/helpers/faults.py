"""A fault-injecting loopback HTTP proxy for S3 tests: put it between s3fs and the moto server.

Each client connection carries one request (the proxy answers ``Connection: close``, so clients
open a new connection per request, as after any network error). For every request the proxy
asks its schedule for a fault and then does one of:

- ``None``: forward the request and return the answer unchanged;
- ``"reset"``: reset the connection (TCP RST) before the request reaches the server;
- ``"reset_after"``: forward the request (the server acts on it), then reset instead of answering;
- ``"500"`` / ``"503"``: answer ``InternalError`` / ``SlowDown`` (S3's throttling reply) without
  forwarding;
- ``"stall"``: forward, then hold the answer for ``stall_s`` seconds before sending it;
- ``"truncate"``: forward, then send the headers and half of the body and close;
- ``"silent"``: read the request and never answer (until the proxy stops).

Schedules are plain callables ``(request_number, request_line) -> fault`` (the line is
``"GET /bucket/key?query HTTP/1.1"``); :class:`EveryNth` cycles
through fault kinds on every n-th request. ``injected`` counts what was done, per kind; ``log``
holds every request's arrival (``time.monotonic()``, number, request line, fault), for timelines.
"""

from __future__ import annotations

import collections
import socket
import struct
import time
from collections.abc import Callable, Sequence

from tests.helpers.proxy import LoopbackProxy

Schedule = Callable[[int, str], str | None]
FAULT_KINDS = ("reset", "reset_after", "500", "503", "stall", "truncate")

_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


class EveryNth:
    """Fault every ``n``-th request from request ``start`` on, cycling through ``kinds``."""

    def __init__(self, n: int, kinds: Sequence[str] = FAULT_KINDS, start: int = 1, limit: int | None = None):
        self.n, self.kinds, self.start, self.limit = n, list(kinds), start, limit
        self.count = 0

    def __call__(self, number: int, line: str) -> str | None:
        if number < self.start or (number - self.start) % self.n:
            return None
        if self.limit is not None and self.count >= self.limit:
            return None
        kind = self.kinds[self.count % len(self.kinds)]
        if kind == "truncate" and not line.startswith("GET "):
            kind = "reset_after"  # only GET answers have a body worth cutting
        self.count += 1
        return kind


def silent_from(first: int) -> Schedule:
    """Every request from number ``first`` on gets no answer: a store that went silent."""
    return lambda number, line: "silent" if number >= first else None


def silent_from_first(marker: str) -> Schedule:
    """Every request from the first one whose request line contains ``marker`` on gets no answer
    (e.g. ``"PUT /bucket/out/.swudi-work/decompositions/"``: silent once the merge writes its first layer)."""
    first: list[int] = []

    def schedule(number: int, line: str) -> str | None:
        if not first and marker in line:
            first.append(number)
        return "silent" if first and number >= first[0] else None

    return schedule


class FaultProxy(LoopbackProxy):
    """Forward 127.0.0.1:<port> to ``target``, injecting the faults ``schedule`` asks for."""

    def __init__(self, target_host: str, target_port: int, schedule: Schedule | None = None, stall_s: float = 3.0):
        super().__init__(target_host, target_port)
        self.schedule: Schedule = schedule or (lambda number, line: None)
        self.stall_s = stall_s
        self.requests = 0
        self.injected: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[float, int, str, str | None]] = []  # (time.monotonic(), number, request line, fault)

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    # ------------------------------------------------------------------------------ plumbing
    def handle(self, client: socket.socket) -> None:
        self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        try:
            request = _read_request(client)
            if request is None:
                return
            line = request.split(b"\r\n", 1)[0].decode("ascii", "replace")
            with self._lock:  # numbers, schedule and log in arrival order
                self.requests += 1
                number = self.requests
                fault = self.schedule(number, line)
                self.log.append((time.monotonic(), number, line, fault))
                if fault is not None:
                    self.injected[fault] += 1
            self._answer(client, request, fault)
        except OSError:
            pass
        finally:
            client.close()

    def _answer(self, client: socket.socket, request: bytes, fault: str | None) -> None:
        if fault == "silent":
            self._stopped.wait()
            return
        if fault == "reset":
            _reset(client)
            return
        if fault in _ERRORS:
            client.sendall(_error_response(*_ERRORS[fault]))
            return
        response = self._forward(request)
        if fault == "reset_after":
            _reset(client)
        elif fault == "stall":
            self._stopped.wait(self.stall_s)
            client.sendall(response)
        elif fault == "truncate":
            head, _, body = response.partition(b"\r\n\r\n")
            client.sendall(head + b"\r\n\r\n" + body[: len(body) // 2])
        else:
            client.sendall(response)

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.target, timeout=60) as upstream:
            upstream.sendall(request)
            chunks = []
            while data := upstream.recv(1 << 16):
                chunks.append(data)
        return _force_close(b"".join(chunks))


# ---------------------------------------------------------------------------------- HTTP bits
def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.strip().lower()] = value.strip()
    return out


def _force_close(message: bytes) -> bytes:
    """``message`` with its ``Connection`` header replaced by ``Connection: close``."""
    head, sep, body = message.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + sep + body


def _recv_until(sock: socket.socket, buffer: bytes, marker: bytes) -> bytes | None:
    while marker not in buffer:
        data = sock.recv(1 << 16)
        if not data:
            return None
        buffer += data
    return buffer


def _read_request(client: socket.socket) -> bytes | None:
    """One whole request (headers and body) from ``client``, rewritten to ``Connection: close``."""
    buffer = _recv_until(client, b"", b"\r\n\r\n")
    if buffer is None:
        return None
    head, _, body = buffer.partition(b"\r\n\r\n")
    headers = _headers(head)
    if headers.get(b"expect", b"").lower() == b"100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        complete = _recv_until(client, body, b"0\r\n\r\n")
        body = complete if complete is not None else body
    else:
        length = int(headers.get(b"content-length", b"0") or 0)
        while len(body) < length:
            data = client.recv(min(1 << 16, length - len(body)))
            if not data:
                break
            body += data
    return _force_close(head + b"\r\n\r\n" + body)


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the peer sees 'connection reset by peer'."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
