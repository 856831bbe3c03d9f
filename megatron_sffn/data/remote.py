"""Reading corpus files from remote storage: HTTP(S) range requests, or any fsspec URL.

An ``http(s)://`` file is opened as a seekable, read-only file whose reads
become ``Range`` requests, so pyarrow reads a parquet file's footer and then
only the column chunks of the row groups it needs, never the whole file per
row group.  Each request fetches at least ``readahead`` bytes (bounded: one
block per open file), transient failures (connection refused or reset,
timeouts, HTTP 408/429/5xx) are retried with exponential backoff, and a
permanent one (404, 401, 403, a server that ignores ``Range``) is a
``RemoteReadError`` naming the URL at once.  Other schemes (``hf://``,
``s3://`` with ``s3fs``, ...) go through ``fsspec``, with its own caching.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_READAHEAD = 1 << 20
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RemoteReadError(OSError, ValueError):
    """A remote file that cannot be read; the message names the URL and why.

    An ``OSError`` for readers that handle I/O failures, and a ``ValueError``
    like every other bad input, so entry points report it as a clean error.
    """


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried (delays double up to ``max_delay``)."""

    attempts: int = 8
    first_delay: float = 0.25
    max_delay: float = 8.0
    timeout: float = 30.0  # seconds per request

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.first_delay * 2**i) for i in range(self.attempts - 1)]


DEFAULT_RETRY = RetryPolicy()


def is_remote(path: str) -> bool:
    """A URL with a scheme other than ``file`` (a Windows drive letter is not a scheme)."""
    scheme = urllib.parse.urlsplit(path).scheme
    return len(scheme) > 1 and scheme != "file"


def url_name(url: str) -> str:
    """The file name a URL ends with, ignoring any query string (``...data.parquet?download=1``)."""
    return os.path.basename(urllib.parse.urlsplit(url).path)


def open_remote(url: str, readahead: int | None = None, retry: RetryPolicy | None = None) -> BinaryIO:
    """A seekable binary file over ``url`` (defaults: this module's ``DEFAULT_READAHEAD`` and ``DEFAULT_RETRY``)."""
    readahead = readahead or DEFAULT_READAHEAD
    retry = retry or DEFAULT_RETRY
    if urllib.parse.urlsplit(url).scheme in ("http", "https"):
        return io.BufferedReader(HttpRangeFile(url, readahead, retry), buffer_size=8192)
    try:
        import fsspec
    except ImportError as exc:
        raise RemoteReadError(f"{url}: reading this scheme needs fsspec (pip install fsspec)") from exc
    try:
        return fsspec.open(url, "rb", block_size=readahead).open()
    except (OSError, ValueError, ImportError) as exc:
        raise RemoteReadError(f"{url}: cannot open ({exc})") from exc


def glob_remote(pattern: str) -> list[str]:
    """The URLs matching an fsspec glob (``hf://datasets/org/name/data/*.parquet``), sorted; an
    ``http(s)`` URL is taken literally (HTTP has no listing)."""
    if urllib.parse.urlsplit(pattern).scheme in ("http", "https") or not any(c in pattern for c in "*?["):
        return [pattern]
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pattern)  # the pattern itself (get_fs_token_paths would expand it already)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return sorted(f"{protocol}://{p}" for p in fs.glob(path))


class HttpRangeFile(io.RawIOBase):
    """A remote file read by HTTP range requests, with one read-ahead block and retries.

    ``bytes_downloaded`` and ``requests`` count what crossed the network, for
    measuring read amplification.
    """

    def __init__(self, url: str, readahead: int = DEFAULT_READAHEAD, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        super().__init__()
        self.url, self.readahead, self.retry = url, readahead, retry
        self.bytes_downloaded = self.requests = 0
        self._pos = 0
        self._block_start, self._block = 0, b""
        self.size = self._fetch_size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.size - self._pos)
        if wanted <= 0:
            return 0
        offset = self._pos - self._block_start
        if not 0 <= offset < len(self._block):
            self._block_start = self._pos
            self._block = self._get_range(self._pos, min(self.size, self._pos + max(wanted, self.readahead)))
            offset = 0
        got = min(wanted, len(self._block) - offset)
        view[:got] = self._block[offset:offset + got]
        self._pos += got
        return got

    def _fetch_size(self) -> int:
        headers = self._request("HEAD", {})[1]
        if headers.get("Content-Length") is None:
            raise RemoteReadError(f"{self.url}: the server sends no Content-Length, so the file cannot be read by ranges")
        return int(headers["Content-Length"])

    def _get_range(self, start: int, stop: int) -> bytes:
        status, headers, body = self._request("GET", {"Range": f"bytes={start}-{stop - 1}"}, partial=True)
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
        if status != 206 or match is None or int(match.group(1)) != start or len(body) != stop - start:
            raise RemoteReadError(
                f"{self.url}: asked for bytes {start}-{stop - 1}, got HTTP {status} with Content-Range "
                f"{headers.get('Content-Range')!r} and {len(body)} bytes; the server must support Range requests"
            )
        if match.group(3) != "*" and int(match.group(3)) != self.size:
            raise RemoteReadError(f"{self.url}: the file changed size from {self.size} to {match.group(3)} bytes")
        return body

    def _request(self, method: str, headers: dict[str, str], partial: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One request, retried on transient failures; a permanent one raises at once.

        With ``partial`` a response other than 206 is returned without its body,
        so a server that ignores ``Range`` never sends the whole file.
        """
        problem = ""
        for delay in [*self.retry.delays(), None]:
            try:
                request = urllib.request.Request(self.url, method=method, headers=headers)
                with urllib.request.urlopen(request, timeout=self.retry.timeout) as response:
                    if partial and response.status != 206:
                        return response.status, dict(response.headers), b""
                    body = response.read()
                    self.requests += 1
                    self.bytes_downloaded += len(body)
                    expected = response.headers.get("Content-Length")
                    if method == "GET" and expected is not None and int(expected) != len(body):
                        raise http.client.IncompleteRead(body, int(expected) - len(body))
                    return response.status, dict(response.headers), body
            except urllib.error.HTTPError as exc:
                if exc.code not in _TRANSIENT_STATUS:
                    raise RemoteReadError(f"{self.url}: HTTP {exc.code} {exc.reason} (not retried)") from exc
                problem = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout) as exc:
                problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if delay is None:
                break
            log.warning("%s: %s; retrying in %.2g s", self.url, problem, delay)
            time.sleep(delay)
        raise RemoteReadError(f"{self.url}: {method} failed after {self.retry.attempts} attempts (last: {problem})")
