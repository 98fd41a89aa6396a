"""Checkpoint download against a local HTTP server (no external traffic): resume via Range, size check, offline."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mm_llama.imagebind import IMAGEBIND_HUGE_URL, DownloadError, download_imagebind_checkpoint

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
REPO = Path(__file__).resolve().parents[1]


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; `server.short_body` sends less than announced on HEAD."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()

    def do_GET(self):
        self.server.ranges.append(self.headers.get("Range"))
        body, status = PAYLOAD, 200
        if self.server.short_body:
            body = PAYLOAD[: len(PAYLOAD) // 2]
        elif self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            body, status = PAYLOAD[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.ranges, httpd.short_body = [], False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/imagebind_huge.pth"


def test_default_url_is_the_one_metas_imagebind_downloads():
    """Checked against the real source of the URL: Meta's `imagebind_huge(pretrained=True)` (facebookresearch/ImageBind,
    also linked from its README), where that package is installed."""
    import inspect

    meta_model = pytest.importorskip("imagebind.models.imagebind_model", reason="Meta's imagebind is not installed")
    assert IMAGEBIND_HUGE_URL in inspect.getsource(meta_model.imagebind_huge)


def test_downloader_fetches_the_default_url_and_names_it_when_unreachable(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    asked = []

    def offline(request, timeout):
        asked.append((request.full_url, request.get_method()))
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match=f"Cannot reach {IMAGEBIND_HUGE_URL} \\(network is unreachable\\)"):
        download_imagebind_checkpoint(tmp_path / "imagebind_huge.pth")
    assert asked == [(IMAGEBIND_HUGE_URL, "HEAD")]
    assert not list(tmp_path.iterdir())  # nothing written before the size is known


def test_fresh_download(tmp_path, server):
    out = download_imagebind_checkpoint(tmp_path / "ckpt" / "imagebind_huge.pth", _url(server))
    assert out.read_bytes() == PAYLOAD
    assert server.ranges == [None]
    assert not (tmp_path / "ckpt" / "imagebind_huge.pth.part").exists()


def test_partial_file_is_resumed_with_a_range_request(tmp_path, server):
    target = tmp_path / "imagebind_huge.pth"
    (tmp_path / "imagebind_huge.pth.part").write_bytes(PAYLOAD[:3000])
    download_imagebind_checkpoint(target, _url(server))
    assert server.ranges == ["bytes=3000-"]
    assert target.read_bytes() == PAYLOAD


def test_complete_file_is_kept_and_wrong_size_file_refused(tmp_path, server):
    target = tmp_path / "imagebind_huge.pth"
    target.write_bytes(PAYLOAD)
    download_imagebind_checkpoint(target, _url(server))
    assert server.ranges == []  # nothing fetched
    target.write_bytes(PAYLOAD[:10])
    with pytest.raises(DownloadError, match="exists with 10 bytes but .* has 10240"):
        download_imagebind_checkpoint(target, _url(server))


def test_short_transfer_fails_the_size_check_and_keeps_the_part(tmp_path, server):
    server.short_body = True
    target = tmp_path / "imagebind_huge.pth"
    with pytest.raises(DownloadError, match="5120 bytes .* announced 10240"):
        download_imagebind_checkpoint(target, _url(server))
    assert not target.exists()
    assert (tmp_path / "imagebind_huge.pth.part").stat().st_size == 5120


def test_offline_error_is_clear(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/imagebind_huge.pth"
    with pytest.raises(DownloadError, match=r"Cannot reach http://127\.0\.0\.1:\d+/imagebind_huge\.pth"):
        download_imagebind_checkpoint(tmp_path / "x.pth", url, timeout=5)

    from mm_llama.cli import main as cli

    assert cli(["download-imagebind", "--output", str(tmp_path / "x.pth"), "--url", url, "--timeout", "5", "--no_progress"]) == 1
