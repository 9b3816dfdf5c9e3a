"""URL fetching against a real http.server on 127.0.0.1 (never any other address):
cache hits without network, retries only where they can help, timeouts, truncation,
size limits, atomic cache files, and download_failed rejections from resolve_source."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bucketing.download import Downloader, DownloadError, default_cache_dir
from bucketing.scan import scan
from bucketing.sources import resolve_source


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes(12, 9)
OTHER = png_bytes(9, 12)


class Server:
    """A threaded loopback server whose path picks the behaviour; counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.scripts: list[dict] = []
        self.release = threading.Event()  # stalled handlers wait for this (or 10 s)
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                state.hits[self.path] += 1
                # the client may give up first (timeouts): expected, not an error
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.respond(self.path, state.hits[self.path])

            def send(self, body: bytes, status: int = 200, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/png" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def scripted(self, script: dict) -> None:
                self.send_response(script["status"])
                for name, value in script["headers"]:
                    self.send_header(name, value)
                self.end_headers()
                for piece in script["pieces"]:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    if state.release.wait(script["pause"]):
                        return
                self.close_connection = True

            def respond(self, path: str, hit: int) -> None:
                kind = path.split("/")[1]
                if kind == "ok":
                    self.send(OTHER if path.endswith("other.png") else PNG)
                elif kind == "slow":  # each request takes 0.5 s: shows parallel fetching
                    time.sleep(0.5)
                    self.send(png_bytes(10 + int(path.split("/")[2][0]), 10))
                elif kind == "missing":
                    self.send(b"not found", status=404)
                elif kind == "flaky":  # 503 on the first request, then the image
                    self.send(b"busy", status=503) if hit == 1 else self.send(PNG)
                elif kind == "stall":  # never answers within the client's timeout
                    state.release.wait(10)
                elif kind == "truncated":  # promises more bytes than it sends, then hangs up
                    self.send(PNG[:50], length=len(PNG))
                    self.close_connection = True
                elif kind == "huge":
                    self.send(b"", length=10**9)
                elif kind == "endless":  # no Content-Length: body runs until the limit trips
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    self.close_connection = True
                    for _ in range(64):
                        self.wfile.write(b"\0" * 4096)
                elif kind == "empty":
                    self.send(b"")
                elif kind == "drip":  # a byte every 50 ms, each well within the timeout
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    for byte in PNG:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if state.release.wait(0.05):
                            return
                elif kind == "slowheaders":  # the status line, then a header byte every 50 ms
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for byte in b"X-Padding: " + b"a" * 400:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if state.release.wait(0.05):
                            return
                elif kind == "chunks":  # chunked encoding that never ends
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while not state.release.wait(0.02):
                        self.wfile.write(b"1\r\n\0\r\n")
                        self.wfile.flush()
                elif kind == "redirect":  # /redirect/<status>/<scheme>
                    _, _, status, scheme = path.split("/")[:4]
                    target = {
                        "ftp": "ftp://127.0.0.1/x.png",
                        "file": "file:///etc/passwd",
                        "http": "/ok/a.png",
                    }[scheme]
                    self.send_response(int(status))
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind in ("gzip", "deflate", "rawdeflate", "bomb", "br"):
                    body = {
                        "gzip": lambda: gzip.compress(PNG),
                        "deflate": lambda: zlib.compress(PNG),
                        "rawdeflate": lambda: zlib.compress(PNG, wbits=-15),
                        "bomb": lambda: gzip.compress(b"\0" * 10_000_000),
                        "br": lambda: PNG,
                    }[kind]()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    encoding = {"rawdeflate": "deflate", "bomb": "gzip"}.get(kind, kind)
                    self.send_header("Content-Encoding", encoding)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif kind == "script":  # /script/<n>: the n-th scripted response
                    self.scripted(state.scripts[int(path.split("/")[2])])
                elif kind == "notimage":
                    self.send(b"<html>not an image</html>")
                else:
                    self.send(b"?", status=400)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


def fast(tmp_path: Path, **kw) -> Downloader:
    """A downloader with short timeouts and backoff so failure tests stay quick."""
    opts = {"timeout": 0.5, "retries": 2, "backoff": 0.01, "max_bytes": 100_000}
    return Downloader(tmp_path / "dl", **{**opts, **kw})


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_fetch_stores_content_addressed_and_reuses_without_network(server, tmp_path):
    url = f"{server.url}/ok/a.png"
    path = fast(tmp_path).fetch(url)
    assert Path(path).read_bytes() == PNG and path.endswith(".png")
    assert Path(path).is_relative_to(tmp_path / "dl" / "objects")
    # a new downloader (a later run) on the same folder: served from disk
    assert fast(tmp_path).fetch(url) == path
    assert server.hits["/ok/a.png"] == 1
    # another URL with the same bytes shares the object
    assert fast(tmp_path).fetch(f"{server.url}/ok/b.png") == path
    assert len(list((tmp_path / "dl" / "objects").rglob("*.png"))) == 1
    with Image.open(path) as img:
        assert img.size == (12, 9)


def test_404_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        fast(tmp_path).fetch(f"{server.url}/missing/x.png")
    assert "attempts" not in str(e.value)
    assert server.hits["/missing/x.png"] == 1  # not retried
    assert fast(tmp_path).cached(f"{server.url}/missing/x.png") is None


def test_5xx_is_retried_then_succeeds(server, tmp_path):
    path = fast(tmp_path).fetch(f"{server.url}/flaky/x.png")
    assert Path(path).read_bytes() == PNG
    assert server.hits["/flaky/x.png"] == 2


def test_stall_times_out_and_retries(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"timed out after 0.3s \(after 2 attempts\)"):
        fast(tmp_path, timeout=0.3, retries=1).fetch(f"{server.url}/stall/x.png")
    assert time.monotonic() - start < 5
    assert server.hits["/stall/x.png"] == 2
    assert no_temp_files(tmp_path)


def test_truncated_body_is_retried_and_never_cached(server, tmp_path):
    with pytest.raises(DownloadError, match="truncated") as e:
        fast(tmp_path).fetch(f"{server.url}/truncated/x.png")
    assert "after 3 attempts" in str(e.value)
    assert server.hits["/truncated/x.png"] == 3
    assert not (tmp_path / "dl" / "objects").exists() and no_temp_files(tmp_path)


@pytest.mark.parametrize("kind", ["huge", "endless"])
def test_size_limit(server, tmp_path, kind):
    with pytest.raises(DownloadError, match="too large"):
        fast(tmp_path, max_bytes=50_000).fetch(f"{server.url}/{kind}/x.png")
    assert server.hits[f"/{kind}/x.png"] == 1  # not retried
    assert not (tmp_path / "dl" / "objects").exists()


def test_unreachable_and_bad_urls(tmp_path):
    with socket_closed_port() as port, pytest.raises(DownloadError, match="connection failed"):
        fast(tmp_path, retries=1).fetch(f"http://127.0.0.1:{port}/x.png")
    with pytest.raises(DownloadError, match="not an http"):
        fast(tmp_path).fetch("ftp://127.0.0.1/x.png")


def test_malformed_url_is_a_download_error_not_a_crash(tmp_path):
    # urllib raises ValueError before connecting: not retryable, no network touched
    got = fast(tmp_path).fetch_all(["http://[::1/x.jpg", "http://h:port/x.jpg"])
    assert all(isinstance(e, DownloadError) and not e.retryable for e in got.values()), got
    assert "attempts" not in str(got["http://[::1/x.jpg"])
    resolved = resolve_source(["http://[::1/x.jpg"], downloader=fast(tmp_path))
    assert [r.reason for r in resolved.rejections] == ["download_failed"]


def test_cache_that_cannot_be_written_is_a_download_error(server, tmp_path):
    (tmp_path / "file").write_bytes(b"")  # the cache folder would have to be inside a file
    downloader = Downloader(tmp_path / "file" / "dl", retries=2, backoff=0.01)
    with pytest.raises(DownloadError, match="cannot store") as e:
        downloader.fetch(f"{server.url}/ok/a.png")
    assert server.hits["/ok/a.png"] == 1 and not e.value.retryable


def test_empty_body_fails(server, tmp_path):
    with pytest.raises(DownloadError, match="empty body"):
        fast(tmp_path).fetch(f"{server.url}/empty/x.png")


def test_parallel_fetch(server, tmp_path):
    urls = [f"{server.url}/slow/{i}.png" for i in range(8)]
    start = time.monotonic()
    got = fast(tmp_path, timeout=5, workers=8).fetch_all(urls + urls[:2])
    elapsed = time.monotonic() - start
    assert list(got) == urls and all(isinstance(p, str) for p in got.values())
    assert len(set(got.values())) == 8
    assert elapsed < 8 * 0.5 / 2, f"8 fetches of 0.5 s took {elapsed:.2f} s: not parallel"
    assert sum(server.hits.values()) == 8


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "aspect-bucketing" / "downloads")
    assert Downloader().cache_dir == default_cache_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(
        tmp_path / "home" / ".cache" / "aspect-bucketing" / "downloads"
    )


def test_resolve_manifest_with_urls(server, tmp_path):
    local = tmp_path / "local.png"
    local.write_bytes(OTHER)
    (tmp_path / "m.jsonl").write_text(
        "\n".join(
            [
                f'{{"url": "{server.url}/ok/a.png", "caption": ["first", "second"]}}',
                f'{{"url": "{server.url}/missing/b.png", "caption": "gone"}}',
                '{"url": "local.png", "caption": "a local file beside URLs"}',
                f'{{"url": "{server.url}/ok/a.png", "caption": "again"}}',
                f'{{"url": "{server.url}/ok/other.png", "caption": "other"}}',
            ]
        )
    )
    dl = tmp_path / "downloads"
    resolved = resolve_source(tmp_path / "m.jsonl", download_dir=dl)
    paths = [e.path for e in resolved.entries]
    assert [e.captions for e in resolved.entries] == [
        ["first", "second", "again"],
        ["a local file beside URLs"],
        ["other"],
    ]
    assert Path(paths[0]).read_bytes() == PNG and Path(paths[0]).is_relative_to(dl)
    assert paths[1] == str(local) and Path(paths[2]).read_bytes() == OTHER
    got = [(r.path, r.reason) for r in resolved.rejections]
    assert got == [
        (f"{server.url}/missing/b.png", "download_failed"),
        (f"{server.url}/ok/a.png", "duplicate"),
    ]
    assert "line 2: HTTP 404" in resolved.rejections[0].detail
    # a second resolve (a rescan) reads the cache: only the failed URL goes out again
    before = sum(server.hits.values())
    again = resolve_source(tmp_path / "m.jsonl", download_dir=dl)
    assert again.entries == resolved.entries
    assert sum(server.hits.values()) - before == 1
    assert server.hits["/missing/b.png"] == 2


def test_resolve_list_of_urls_with_custom_downloader(server, tmp_path):
    urls = [f"{server.url}/ok/a.png", f"{server.url}/stall/z.png"]
    resolved = resolve_source(urls, downloader=fast(tmp_path, timeout=0.2, retries=0))
    assert [Path(e.path).read_bytes() for e in resolved.entries] == [PNG]
    [rej] = resolved.rejections
    assert (rej.path, rej.reason) == (urls[1], "download_failed")
    assert "item 1: timed out" in rej.detail


class socket_closed_port:
    """A loopback port with nothing listening (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc: object) -> None:
        pass


def test_cache_survives_a_corrupt_url_record(server, tmp_path):
    """A URL record pointing at a missing object is a miss, not an error."""
    url = f"{server.url}/ok/c.png"
    d = fast(tmp_path)
    path = d.fetch(url)
    os.unlink(path)
    assert d.cached(url) is None
    assert d.fetch(url) == path and server.hits["/ok/c.png"] == 2


@pytest.mark.parametrize("kind", ["drip", "slowheaders", "chunks"])
def test_the_deadline_bounds_every_download(server, tmp_path, kind):
    """Each byte arrives well within ``timeout``; only the deadline can end these."""
    start = time.monotonic()
    with pytest.raises(DownloadError, match="too slow: not finished within the deadline of 0.6s"):
        fast(tmp_path, timeout=0.5, deadline=0.6).fetch(f"{server.url}/{kind}/x.png")
    assert time.monotonic() - start < 1.2
    assert server.hits[f"/{kind}/x.png"] == 1  # no retry past the deadline
    assert no_temp_files(tmp_path)


def test_the_deadline_covers_retries(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError):
        fast(tmp_path, timeout=0.2, retries=50, backoff=0.05, deadline=0.8).fetch(
            f"{server.url}/stall/x.png"
        )
    assert time.monotonic() - start < 1.5
    assert 1 <= server.hits["/stall/x.png"] <= 4


@pytest.mark.parametrize("scheme", ["ftp", "file"])
@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirects_only_to_http(server, tmp_path, status, scheme):
    with pytest.raises(DownloadError, match=f"redirected to '{scheme}:.*only http"):
        fast(tmp_path).fetch(f"{server.url}/redirect/{status}/{scheme}")
    path = fast(tmp_path).fetch(f"{server.url}/redirect/{status}/http")  # http hops are fine
    assert Path(path).read_bytes() == PNG


@pytest.mark.parametrize("kind", ["gzip", "deflate", "rawdeflate"])
def test_compressed_bodies_are_decoded(server, tmp_path, kind):
    path = fast(tmp_path).fetch(f"{server.url}/{kind}/x.png")
    assert Path(path).read_bytes() == PNG and path.endswith(".png")


def test_compressed_bodies_are_bounded_after_decoding_or_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="too large: more than max_bytes 100000"):
        fast(tmp_path).fetch(f"{server.url}/bomb/x.png")  # 10 KB on the wire, 10 MB decoded
    with pytest.raises(DownloadError, match="unsupported Content-Encoding 'br'"):
        fast(tmp_path).fetch(f"{server.url}/br/x.png")
    assert server.hits["/bomb/x.png"] == server.hits["/br/x.png"] == 1  # not retried


def test_a_download_that_is_no_image_is_rejected_under_its_url(server, tmp_path):
    url = f"{server.url}/notimage/x.png"
    index = scan([url, f"{server.url}/ok/a.png"], workers=0, download_dir=tmp_path / "dl")
    assert [(r.path, r.reason) for r in index.rejections] == [(url, "not_an_image")]
    assert len(index) == 1 and index.paths[0].startswith(str(tmp_path / "dl"))


@st.composite
def _responses(draw) -> tuple[dict, bytes | None]:
    """A server response, and the bytes a correct client stores (None: it must fail)."""
    body = draw(st.sampled_from([PNG, b"", b"\0" * 3000, png_bytes(40, 30)]))
    encoding = draw(st.sampled_from([None, "gzip", "deflate", "br", "gzip-corrupt"]))
    wire = {
        None: body,
        "gzip": gzip.compress(body),
        "deflate": zlib.compress(body),
        "br": body,
        "gzip-corrupt": gzip.compress(body)[:-6] + b"xxxxxx",
    }[encoding]
    length = draw(st.sampled_from(["exact", "none", "short", "long"]))
    status = draw(st.sampled_from([200, 200, 200, 404, 500, 204]))
    headers = [("Content-Type", draw(st.sampled_from(["image/png", "text/html", "", "x/y;;"])))]
    if encoding:
        headers.append(("Content-Encoding", encoding.split("-")[0]))
    declared = {"exact": len(wire), "short": max(len(wire) - 5, 0), "long": len(wire) + 5}
    if length != "none":
        headers.append(("Content-Length", str(declared[length])))
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    script = {"status": status, "headers": headers, "pieces": pieces,
              "pause": draw(st.sampled_from([0.0, 0.01]))}
    if length == "short" and encoding is None:  # Content-Length is authoritative (as curl)
        body = body[: declared["short"]]
    good = (
        status == 200
        and body
        and encoding in (None, "gzip", "deflate")
        and (length in ("exact", "none") or (length == "short" and encoding is None))
    )
    return script, body if good else None


@settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # the server and tmp_path are shared across examples on purpose: each gets its own script
@given(response=_responses())
def test_sweep_any_server_response_is_the_body_or_a_download_error(server, tmp_path, response):
    """Whatever a server sends within the deadline: the exact (decoded) body is stored, or
    a DownloadError says why; nothing else is raised, and the deadline holds."""
    script, expected = response
    server.scripts.append(script)
    url = f"{server.url}/script/{len(server.scripts) - 1}"
    downloader = fast(tmp_path / str(len(server.scripts)), retries=0, timeout=0.3, deadline=1.0)
    start = time.monotonic()
    try:
        got = Path(downloader.fetch(url)).read_bytes()
    except DownloadError as e:
        got = e
    assert time.monotonic() - start < 1.5
    if expected is None:
        assert isinstance(got, DownloadError), script
    else:
        assert got == expected, (script, got)


def test_a_deflate_body_arriving_a_byte_at_a_time(server, tmp_path):
    """The sweep's find: zlib's two header bytes split across reads."""
    wire = zlib.compress(PNG)
    server.scripts.append(
        {
            "status": 200,
            "headers": [("Content-Encoding", "deflate"), ("Content-Length", str(len(wire)))],
            "pieces": [wire[:1], wire[1:2], wire[2:]],
            "pause": 0.01,
        }
    )
    path = fast(tmp_path).fetch(f"{server.url}/script/0")
    assert Path(path).read_bytes() == PNG


def test_a_tampered_cache_record_is_a_miss_never_a_hang_or_an_escape(server, tmp_path):
    url = f"{server.url}/ok/a.png"
    d = fast(tmp_path)
    good = d.fetch(url)
    record = Path(d._url_file(url))
    outside = tmp_path / "secret.png"
    outside.write_bytes(OTHER)
    for name in [str(outside), "../../secret.png", "ab/../../../secret.png"]:
        record.write_text(name)
        assert d.cached(url) is None, name
    record.unlink()
    os.mkfifo(record)  # reading it would block forever
    assert d.cached(url) is None
    with pytest.raises(DownloadError, match="cannot store .* it is a FIFO"):
        d.fetch(url)  # fetched again, but the FIFO is never replaced
    assert stat.S_ISFIFO(os.stat(record).st_mode) and Path(good).read_bytes() == PNG
