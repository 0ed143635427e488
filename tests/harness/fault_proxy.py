"""A fault-injecting HTTP proxy between the pipeline and an S3 protocol server.

    with FaultProxy("http://127.0.0.1:5000", [Fault("503", method="PUT", times=3)]) as proxy:
        ... use proxy.url as the S3 endpoint ...

Every request is forwarded to `upstream` unless a rule matches it: the first rule whose
method and key fragment match, and that has firings left, answers instead (or, with
`after_forward`, lets the request reach the server and then loses the answer). Kinds:

- "500": InternalError; "503": SlowDown (what S3 says when throttling);
- "reset": the connection is reset (TCP RST), no answer;
- "stall": no answer until `stall_s` has passed, then the connection closes.

`proxy.injected` counts the faults that fired, per kind; `proxy.log` lists every request
(method, path, body bytes, the fault that answered it or None).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    kind: str  # "500" | "503" | "reset" | "stall"
    method: str | None = None  # None: any method
    key_contains: str | None = None  # a fragment of the request path; None: any
    times: float = 1  # firings; float("inf") for a persistent fault
    after_forward: bool = False  # the server gets the request, the client loses the answer
    stall_s: float = 3.0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0
            and (self.method is None or self.method == method)
            and (self.key_contains is None or self.key_contains in path)
        )


class FaultProxy:
    def __init__(self, upstream: str, faults: list[Fault]) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, int, str | None]] = []  # method, path, body, fault
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, method: str, path: str, size: int) -> Fault | None:
        with self._lock:
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.times -= 1
                self.injected[fault.kind] += 1
            self.log.append((method, path, size, fault.kind if fault else None))
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._pick(self.command, self.path, len(body))
                if fault is not None and not fault.after_forward:
                    self._fail(fault)
                    return
                status, headers, answer = self._forward(body)
                if fault is not None:
                    self._fail(fault)
                    return
                self.send_response(status)
                dropped = {"transfer-encoding", "connection"}
                if self.command != "HEAD":  # a HEAD answer keeps the object's length
                    dropped.add("content-length")
                    self.send_header("Content-Length", str(len(answer)))
                for name, value in headers:
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            def _forward(self, body: bytes):
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    dropped = ("connection", "expect")  # the proxy already read the body
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    connection.close()

            def _fail(self, fault: Fault) -> None:
                if fault.kind in ERRORS:
                    status, code, message = ERRORS[fault.kind]
                    body = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault.kind == "stall":
                    time.sleep(fault.stall_s)
                # reset (and the end of a stall): RST instead of an answer
                self.close_connection = True
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()

            def finish(self) -> None:
                with contextlib.suppress(OSError, ValueError):  # reset on purpose
                    super().finish()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # resets are the point; the client sees them
