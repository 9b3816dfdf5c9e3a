"""Fetch ``http(s)://`` images once into a content-addressed local cache.

Layout under ``cache_dir`` (default ``$XDG_CACHE_HOME/aspect-bucketing/downloads``,
i.e. ``~/.cache/...``)::

    urls/<sha256(url)>                 the object name the URL was stored as (text)
    objects/<h[:2]>/<h><ext>           the bytes, h = sha256(content)

A URL whose entry and object both exist is served from disk without any network
access, so later epochs and rescans never refetch; identical contents under two
URLs are stored once. Every file is written atomically (temp + rename). Only the
standard library is used (``urllib``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bucketing.atomic import atomic_path, atomic_write_bytes

__all__ = ["DownloadError", "Downloader", "default_cache_dir", "is_url"]

_CONTENT_TYPES = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/avif": ".avif",
}
_CHUNK = 1 << 16
_OBJECT_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}(\.[a-z]{3,4})?")  # see the layout above


class DownloadError(Exception):
    """A URL that could not be fetched; ``str(e)`` holds the HTTP status or the error."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def is_url(value: str) -> bool:
    """True for ``http://`` and ``https://`` strings (the only schemes fetched)."""
    return value[:8].lower().startswith(("http://", "https://"))


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/aspect-bucketing/downloads`` (XDG default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "aspect-bucketing", "downloads")


@dataclass
class Downloader:
    """Fetch URLs into ``cache_dir`` with timeouts, retries and a size limit.

    ``timeout`` bounds connecting and the wait for each byte (seconds); ``deadline`` bounds
    a whole fetch, retries included: a watchdog cuts the connection when it passes, so a
    server dripping headers or body a byte at a time, or sending chunks forever, cannot
    hold a worker. Only ``http(s)://`` URLs are fetched, at every redirect too.
    Timeouts, connection and TLS errors, truncated bodies, HTTP 5xx/408/429 are retried
    ``retries`` times with exponential ``backoff`` while the deadline allows; other HTTP
    errors (404, 403...), malformed URLs, oversize files, unsupported encodings and a
    cache folder that cannot be written fail at once. A ``gzip``/``deflate``
    ``Content-Encoding`` is decoded, ``max_bytes`` applying to the decoded bytes. Every
    failure is a :class:`DownloadError`. ``workers`` threads fetch in parallel.
    """

    cache_dir: str | os.PathLike | None = None
    timeout: float = 10.0
    deadline: float = 300.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 256 * 1024 * 1024
    workers: int = 8

    def __post_init__(self) -> None:
        self.cache_dir = os.fspath(self.cache_dir or default_cache_dir())

    def _url_file(self, url: str) -> str:
        key = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.cache_dir, "urls", key)

    def cached(self, url: str) -> str | None:
        """The local copy of ``url`` if it was fetched before, without network access. A
        record that is not a small regular file naming an object of this cache (a FIFO, a
        path elsewhere) is a miss: nothing blocks, nothing outside the cache is served."""
        record = self._url_file(url)
        try:
            if not stat.S_ISREG(os.stat(record).st_mode):
                return None
            with open(record, encoding="utf-8") as f:
                name = f.read(200).strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _OBJECT_NAME.fullmatch(name):
            return None
        path = os.path.join(self.cache_dir, "objects", name)
        return path if os.path.isfile(path) else None

    def fetch(self, url: str) -> str:
        """Local path of ``url``'s bytes, downloading them if needed; raises DownloadError."""
        if not is_url(url):
            raise DownloadError(f"not an http(s) URL: {url!r}")
        path = self.cached(url)
        if path is not None:
            return path
        deadline = time.monotonic() + self.deadline
        attempt = 0
        while True:
            try:
                return self._download(url, deadline)
            except DownloadError as e:
                pause = self.backoff * 2**attempt
                late = time.monotonic() + pause >= deadline
                if not e.retryable or attempt >= self.retries or late:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise DownloadError(f"{e}{tries}") from None
            time.sleep(pause)
            attempt += 1

    def fetch_all(self, urls: Iterable[str]) -> dict[str, str | DownloadError]:
        """Fetch distinct ``urls`` in parallel: url -> local path, or the DownloadError."""
        todo = list(dict.fromkeys(urls))

        def one(url: str) -> str | DownloadError:
            try:
                return self.fetch(url)
            except DownloadError as e:
                return e

        if len(todo) <= 1 or self.workers <= 1:
            return {url: one(url) for url in todo}
        with ThreadPoolExecutor(max_workers=min(self.workers, len(todo))) as pool:
            return dict(zip(todo, pool.map(one, todo), strict=True))

    def _download(self, url: str, deadline: float) -> str:
        """One attempt, cut off at ``deadline`` (a ``time.monotonic()`` value)."""
        watchdog = _Watchdog(deadline - time.monotonic())
        opener = urllib.request.build_opener(
            _HTTPHandler(watchdog), _HTTPSHandler(watchdog), _Redirects()
        )
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "aspect-bucketing"})
            timeout = max(min(self.timeout, deadline - time.monotonic()), 0.001)
            with opener.open(request, timeout=timeout) as response:
                chunks, total = self._read_body(response, watchdog)
                ext = _extension(url, response.headers.get_content_type())
        except DownloadError:
            raise
        except Exception as e:
            if watchdog.expired:  # the watchdog cut the connection: whatever broke, too slow
                raise self._too_slow() from None
            raise _as_download_error(e, self.timeout) from None
        finally:
            watchdog.cancel()
        if watchdog.expired:
            raise self._too_slow()
        if total == 0:
            raise DownloadError("empty body")
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        name = digest.hexdigest()
        name = f"{name[:2]}/{name}{ext}"
        target = os.path.join(self.cache_dir, "objects", name)
        try:
            if not os.path.isfile(target):
                with atomic_path(target) as tmp, open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
            atomic_write_bytes(self._url_file(url), name.encode())
        except OSError as e:  # disk full, read-only or unusable cache folder: not a network issue
            raise DownloadError(f"cannot store the download in {self.cache_dir}: {e}") from None
        return target

    def _too_slow(self) -> DownloadError:
        return DownloadError(f"too slow: not finished within the deadline of {self.deadline:g}s")

    def _read_body(
        self, response: http.client.HTTPResponse, watchdog: _Watchdog
    ) -> tuple[list[bytes], int]:
        """The body (decoded if gzip/deflate) as chunks and its size, read a little at a time
        (``read1``), within ``max_bytes`` after decoding."""
        declared = response.headers.get("Content-Length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise DownloadError(
                f"too large: Content-Length {expected} > max_bytes {self.max_bytes}"
            )
        decoder = _Decoder(response.headers.get("Content-Encoding"), self.max_bytes)
        chunks: list[bytes] = []
        received = total = 0
        while not watchdog.expired and (chunk := response.read1(_CHUNK)):
            received += len(chunk)
            chunk = decoder.decode(chunk, self.max_bytes - total)
            total += len(chunk)
            if total > self.max_bytes:
                raise DownloadError(f"too large: more than max_bytes {self.max_bytes}")
            chunks.append(chunk)
        if watchdog.expired:
            raise self._too_slow()
        if expected is not None and received != expected:
            raise DownloadError(
                f"truncated body: got {received} of {expected} bytes", retryable=True
            )
        chunks.append(decoder.finish())
        return chunks, total + len(chunks[-1])


class _Decoder:
    """Undo a ``Content-Encoding`` (gzip, deflate, none) chunk by chunk, never producing
    more than the room left, so a compression bomb stops at ``max_bytes``."""

    def __init__(self, encoding: str | None, max_bytes: int) -> None:
        self.encoding = (encoding or "identity").strip().lower()
        if self.encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise DownloadError(
                f"unsupported Content-Encoding {encoding!r} (gzip and deflate are decoded)"
            )
        self.inflate: Any = None
        self.head = b""

    def decode(self, data: bytes, room: int) -> bytes:
        """The decoded bytes of ``data``; more than ``room`` of them means too large."""
        if self.encoding == "identity":
            return data
        if self.inflate is None:
            self.head += data  # deflate's two header bytes may arrive one at a time
            if len(self.head) < 2:
                return b""
            data, self.head = self.head, b""
            self.inflate = zlib.decompressobj(_wbits(self.encoding, data))
        if self.inflate.eof:
            raise DownloadError(f"data after the end of the {self.encoding} stream")
        try:
            return self.inflate.decompress(data, max(room, 0) + 1)
        except zlib.error as e:
            raise DownloadError(f"corrupt {self.encoding} body: {e}") from None

    def finish(self) -> bytes:
        """What is left at the end of the body; a stream cut short is an error."""
        if self.encoding == "identity":
            return b""
        if self.inflate is None or not self.inflate.eof:
            raise DownloadError(f"truncated {self.encoding} body", retryable=True)
        if self.inflate.unused_data:
            raise DownloadError(f"data after the end of the {self.encoding} stream")
        return b""


def _wbits(encoding: str, head: bytes) -> int:
    """zlib's window bits for a body starting with ``head`` (2 bytes at least): gzip;
    deflate as it should be (zlib-wrapped) or as some servers send it (raw)."""
    if encoding != "deflate":
        return 31
    zlib_header = head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
    return 15 if zlib_header else -15


def _as_download_error(e: Exception, timeout: float) -> DownloadError:
    """The DownloadError for what urllib / http.client / the socket raised."""
    if isinstance(e, urllib.error.HTTPError):
        retry = e.code >= 500 or e.code in (408, 429)
        return DownloadError(f"HTTP {e.code} {e.reason}", retryable=retry)
    if isinstance(e, urllib.error.URLError):
        if isinstance(e.reason, DownloadError):
            return e.reason
        return DownloadError(
            f"connection failed: {e.reason}", retryable=isinstance(e.reason, OSError)
        )
    if isinstance(e, TimeoutError):
        return DownloadError(f"timed out after {timeout:g}s", retryable=True)
    if isinstance(e, http.client.IncompleteRead):
        return DownloadError(
            f"truncated body: got {len(e.partial)} more bytes, {e.expected} missing",
            retryable=True,
        )
    if isinstance(e, (http.client.HTTPException, OSError)):  # resets, TLS errors, ...
        return DownloadError(f"{type(e).__name__}: {e}", retryable=True)
    if isinstance(e, ValueError):  # a malformed URL (bad IPv6 host, port): before connecting
        return DownloadError(f"invalid URL: {e}")
    raise e


class _Watchdog:
    """Cuts one download's connections when its deadline passes: a blocked read then ends
    at once, however slowly the server drips headers or body (socket timeouts bound only
    the wait for each byte)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        """Register ``sock`` (cut now if the deadline already passed) and return it."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _cut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _cut(sock)

    def cancel(self) -> None:
        """Stop the timer (the download ended in time)."""
        self._timer.cancel()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd itself, TLS or not


class _WatchedHTTP(http.client.HTTPConnection):
    """An HTTP connection whose sockets a :class:`_Watchdog` can cut."""

    def __init__(self, *args: Any, watchdog: _Watchdog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        connect = self._create_connection
        self._create_connection = lambda *a, **k: watchdog.watch(connect(*a, **k))
        self._watchdog = watchdog

    def connect(self) -> None:
        """Connect (TCP, then TLS for https) under the watchdog."""
        super().connect()
        self._watchdog.watch(self.sock)


class _WatchedHTTPS(_WatchedHTTP, http.client.HTTPSConnection):
    """The HTTPS variant: the raw socket is watched during the TLS handshake, then the
    TLS socket."""


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTP, req, watchdog=self.watchdog)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPS, req, context=self._context, watchdog=self.watchdog)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to ``http(s)://`` URLs (urllib alone would follow ``ftp://``)."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urllib.parse.urljoin(req.full_url, location)
            if not is_url(target):
                raise DownloadError(f"redirected to {target!r}: only http(s) URLs are fetched")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _extension(url: str, content_type: str) -> str:
    """File extension for a download: from the Content-Type, else from the URL's path."""
    if content_type in _CONTENT_TYPES:
        return _CONTENT_TYPES[content_type]
    ext = os.path.splitext(urllib.parse.urlsplit(url).path)[1].lower()
    return ext if ext in set(_CONTENT_TYPES.values()) | {".jpeg", ".tif"} else ""
