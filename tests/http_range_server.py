"""A local HTTP file server with ``Range`` support and scripted failures, for remote-input tests.

    with RangeServer(root) as server:
        url = server.url("web.parquet")
        server.fail("web.parquet", ["503", "drop", "503"])   # the next three requests for it fail
        ...
        server.bytes_sent                                       # body bytes served so far

Only 127.0.0.1 is bound; nothing leaves the machine.
"""

from __future__ import annotations

import os
import re
import threading
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class RangeServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._failures: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def fail(self, name: str, actions: list[str]) -> None:
        """The next requests for ``name`` fail in turn: an HTTP status code ("503") or "drop" (close the
        connection without answering) or "short" (send half the body)."""
        with self._lock:
            self._failures["/" + name].extend(actions)

    def pending_failures(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._failures.values())

    def _next_failure(self, path: str) -> str | None:
        with self._lock:
            queue = self._failures.get(path)
            return queue.popleft() if queue else None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                server.requests.append((self.command, self.path, self.headers.get("Range")))
                failure = server._next_failure(self.path)
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if failure is not None and failure != "short":
                    self.send_error(int(failure))
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                size = os.path.getsize(path)
                start, stop, status = 0, size, 200
                match = _RANGE.fullmatch(self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(stop - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.end_headers()
                if body:
                    with open(path, "rb") as f:
                        f.seek(start)
                        data = f.read(stop - start)
                    if failure == "short":
                        data = data[: len(data) // 2]
                        self.close_connection = True
                    self.wfile.write(data)
                    with server._lock:
                        server.bytes_sent += len(data)

        return Handler
