"""WebVid downloader against a local HTTP server on 127.0.0.1 (never an external address)."""

from __future__ import annotations

import csv
import functools
import json
import socket
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mm_llama.data.webvid import OfflineError, download_webvid, needed_videos, plan_downloads


class FlakyHandler(SimpleHTTPRequestHandler):
    """Serves files from the server's folder; paths in `server.flaky` answer 503 to their first request."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests[self.path] += 1
        if self.path in self.server.flaky and self.server.requests[self.path] == 1:
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FlakyHandler, directory=str(served)))
    httpd.requests, httpd.flaky = Counter(), set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def write_inputs(tmp_path: Path, base_url: str, ids: list[str], in_metadata: list[str]) -> tuple[Path, Path]:
    """A VideoChat JSON using `ids` and a WebVid metadata CSV listing `in_metadata` (plus unrelated rows)."""
    videochat = tmp_path / "videochat_instruct_11k.json"
    videochat.write_text(json.dumps(
        [{"video": f"0001_0050/{i}.mp4", "QA": [{"q": "Q", "a": "A"}]} for i in ids]
        + [{"video": f"0001_0050/{ids[0]}.mp4", "QA": [{"q": "Again", "a": "A"}]}, {"QA": []}]
    ))
    metadata = tmp_path / "results_10M_train.csv"
    with metadata.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in in_metadata + ["999", "998"]:
            writer.writerow([i, f"{base_url}/{i}.mp4", "PT00H00M10S", "0001_0050", f"video {i}"])
    return videochat, metadata


def test_downloads_only_needed_videos_with_retries_and_resume(server, tmp_path):
    httpd, served, base = server
    for i in ("1", "2", "3", "999"):
        (served / f"{i}.mp4").write_bytes(f"video {i}".encode() * 100)
    videochat, metadata = write_inputs(tmp_path, base, ["1", "2", "3", "4", "5"], ["1", "2", "3", "4"])
    assert needed_videos(videochat) == {i: f"0001_0050/{i}.mp4" for i in "12345"}
    httpd.flaky.add("/2.mp4")  # first request fails with 503, the retry succeeds
    out = tmp_path / "webvid"
    (out / "0001_0050").mkdir(parents=True)
    (out / "0001_0050" / "3.mp4.part").write_bytes(b"half")  # left by a killed run: replaced

    report = download_webvid(videochat, metadata, out, num_threads=4, retries=2, backoff=0.01)

    assert report.needed == 5 and report.downloaded == 3 and report.skipped_existing == 0
    assert report.missing_in_metadata == ["5"]
    assert list(report.failed) == ["4"] and "404" in report.failed["4"]["error"]
    assert report.failed["4"]["attempts"] == 1  # a 404 is final: not retried
    for i in ("1", "2", "3"):
        assert (out / "0001_0050" / f"{i}.mp4").read_bytes() == (served / f"{i}.mp4").read_bytes()
    assert not list(out.rglob("*.part"))
    assert httpd.requests["/2.mp4"] == 2 and httpd.requests["/999.mp4"] == 0  # unneeded videos are not fetched
    failures = json.loads((out / "download_failures.json").read_text())
    assert list(failures["failed"]) == ["4"] and failures["missing_in_metadata"] == ["5"]

    # A re-run skips what exists and fetches only what failed before.
    (served / "4.mp4").write_bytes(b"video 4")
    before = Counter(httpd.requests)
    report = download_webvid(videochat, metadata, out, layout="folder", num_threads=2, backoff=0.01)
    assert report.skipped_existing == 3 and report.downloaded == 1 and not report.failed
    assert httpd.requests["/1.mp4"] == before["/1.mp4"]


def test_flat_layout_and_retry_exhaustion(server, tmp_path):
    httpd, served, base = server
    (served / "7.mp4").write_bytes(b"seven")
    videochat, metadata = write_inputs(tmp_path, base, ["7"], ["7"])
    httpd.flaky.add("/7.mp4")
    report = download_webvid(videochat, metadata, tmp_path / "flat", layout="flat", retries=0, backoff=0.01)
    assert report.failed["7"]["attempts"] == 1 and "503" in report.failed["7"]["error"]
    report = download_webvid(videochat, metadata, tmp_path / "flat", layout="flat", retries=0)
    assert report.downloaded == 1 and (tmp_path / "flat" / "7.mp4").read_bytes() == b"seven"
    assert not (tmp_path / "flat" / "download_failures.json").exists()  # cleared by the clean run


def test_offline_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    videochat, metadata = write_inputs(tmp_path, f"http://127.0.0.1:{port}", ["1"], ["1"])
    with pytest.raises(OfflineError, match=rf"Cannot reach http://127.0.0.1:{port}.*network"):
        download_webvid(videochat, metadata, tmp_path / "out", backoff=0.01)


def test_metadata_errors_name_the_file(tmp_path):
    videochat, _ = write_inputs(tmp_path, "http://127.0.0.1:1", ["1"], ["1"])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,url\n1,x\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['contentUrl', 'videoid'\]"):
        plan_downloads(videochat, bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        plan_downloads(videochat, tmp_path / "nope.csv")
