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

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

    ``timeout`` bounds connecting and every socket read (seconds); ``deadline`` bounds
    one whole attempt, so a server dripping bytes cannot hold a worker forever.
    Timeouts, connection and TLS errors, truncated bodies, HTTP 5xx/408/429 are retried
    ``retries`` times with exponential ``backoff``; other HTTP errors (404, 403...),
    malformed URLs, oversize files and a cache folder that cannot be written fail at
    once. Every failure is a :class:`DownloadError`. ``workers`` threads fetch in parallel.
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
        """The local copy of ``url`` if it was fetched before, without network access."""
        try:
            with open(self._url_file(url), encoding="utf-8") as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError):
            return None
        path = os.path.join(self.cache_dir, "objects", name)
        return path if name and os.path.isfile(path) else None

    def fetch(self, url: str) -> str:
        """Local path of ``url``'s bytes, downloading them if needed; raises DownloadError."""
        if not is_url(url):
            raise DownloadError(f"not an http(s) URL: {url!r}")
        path = self.cached(url)
        if path is not None:
            return path
        attempt = 0
        while True:
            try:
                return self._download(url)
            except DownloadError as e:
                if not e.retryable or attempt >= self.retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise DownloadError(f"{e}{tries}") from None
            time.sleep(self.backoff * 2**attempt)
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

    def _download(self, url: str) -> str:
        start = time.monotonic()
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "aspect-bucketing"})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                expected = int(declared) if declared and declared.isdigit() else None
                if expected is not None and expected > self.max_bytes:
                    raise DownloadError(
                        f"too large: Content-Length {expected} > max_bytes {self.max_bytes}"
                    )
                digest = hashlib.sha256()
                chunks, total = [], 0
                while chunk := response.read(_CHUNK):
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise DownloadError(f"too large: more than max_bytes {self.max_bytes}")
                    if time.monotonic() - start > self.deadline:
                        raise DownloadError(
                            f"too slow: not finished after {self.deadline:g}s", retryable=True
                        )
                    digest.update(chunk)
                    chunks.append(chunk)
                if expected is not None and total != expected:
                    raise DownloadError(
                        f"truncated body: got {total} of {expected} bytes", retryable=True
                    )
                ext = _extension(url, response.headers.get_content_type())
        except urllib.error.HTTPError as e:
            retry = e.code >= 500 or e.code in (408, 429)
            raise DownloadError(f"HTTP {e.code} {e.reason}", retryable=retry) from None
        except urllib.error.URLError as e:
            retry = isinstance(e.reason, OSError)
            raise DownloadError(f"connection failed: {e.reason}", retryable=retry) from None
        except TimeoutError:
            raise DownloadError(f"timed out after {self.timeout:g}s", retryable=True) from None
        except http.client.IncompleteRead as e:
            raise DownloadError(
                f"truncated body: got {len(e.partial)} more bytes, {e.expected} missing",
                retryable=True,
            ) from None
        except (http.client.HTTPException, OSError) as e:  # resets, TLS errors, ...
            raise DownloadError(f"{type(e).__name__}: {e}", retryable=True) from None
        except ValueError as e:  # a malformed URL (bad IPv6 host, port): fails before connecting
            raise DownloadError(f"invalid URL: {e}") from None
        if total == 0:
            raise DownloadError("empty body")
        name = digest.hexdigest()
        name = os.path.join(name[:2], name + ext)
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


def _extension(url: str, content_type: str) -> str:
    """File extension for a download: from the Content-Type, else from the URL's path."""
    if content_type in _CONTENT_TYPES:
        return _CONTENT_TYPES[content_type]
    ext = os.path.splitext(urllib.parse.urlsplit(url).path)[1].lower()
    return ext if ext in set(_CONTENT_TYPES.values()) | {".jpeg", ".tif"} else ""
