"""Downloading the WebVid videos that a VideoChat JSON uses, from the WebVid-10M metadata CSV.

VideoChat-11K names videos `<page_dir>/<videoid>.mp4`; the WebVid-10M metadata CSV (columns `videoid`,
`contentUrl`, `page_dir`, ...) gives each video's URL. Only the needed rows are kept while streaming the CSV (it has
10M rows). Downloads run in threads (network-bound), each to `<name>.part` then renamed, so an interrupted run
leaves no half file under the final name and a re-run skips what exists. Transient failures are retried with
exponential backoff; failures are reported in a JSON file.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..progress import progress_bar
from .sources import load_json_list

# HTTP statuses worth retrying: the server is busy or failing, not saying "this file does not exist".
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


class OfflineError(ConnectionError):
    """The download host cannot be reached at all (no network, DNS failure, proxy or firewall)."""


@dataclass(frozen=True)
class VideoJob:
    """One video to fetch: its WebVid id, URL, and where it goes (relative to the output folder)."""

    videoid: str
    url: str
    relative_path: str


@dataclass
class DownloadReport:
    """Outcome of a download run. `failed` maps videoid -> {"url", "error", "attempts"}."""

    needed: int = 0
    downloaded: int = 0
    skipped_existing: int = 0
    missing_in_metadata: list[str] = field(default_factory=list)
    failed: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def needed_videos(videochat_json: str | os.PathLike) -> dict[str, str]:
    """videoid -> relative path (`<folder>/<videoid>.mp4`) for every distinct video a VideoChat JSON uses.

    Records without a usable "video" string are ignored here (the dataset reader skips and counts them).
    """
    needed: dict[str, str] = {}
    for raw in load_json_list(videochat_json):
        video = raw.get("video") if isinstance(raw, dict) else None
        if isinstance(video, str) and video:
            needed.setdefault(Path(video).stem, video)
    return needed


def read_metadata(csv_path: str | os.PathLike, videoids: Iterable[str]) -> dict[str, dict]:
    """Streams the WebVid metadata CSV and returns the rows (as dicts) of the wanted `videoids` only."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such file. Pass the WebVid-10M metadata CSV (e.g. results_10M_train.csv).")
    wanted = set(videoids)
    rows: dict[str, dict] = {}
    with csv_path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"videoid", "contentUrl"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {sorted(missing)}; a WebVid metadata CSV has videoid, contentUrl, "
                f"page_dir, ... (found {reader.fieldnames})."
            )
        for row in reader:
            if row["videoid"] in wanted:
                rows[row["videoid"]] = row
                if len(rows) == len(wanted):
                    break
    return rows


def plan_downloads(videochat_json: str | os.PathLike, metadata_csv: str | os.PathLike, layout: str = "folder"
                   ) -> tuple[list[VideoJob], list[str]]:
    """The jobs for every needed video found in the metadata, and the ids the metadata lacks.

    `layout`: "folder" saves as the JSON names it (`<folder>/<videoid>.mp4`), "flat" as `<videoid>.mp4`; the
    VideoChat reader finds either.
    """
    if layout not in ("folder", "flat"):
        raise ValueError(f"layout must be 'folder' or 'flat', got {layout!r}")
    needed = needed_videos(videochat_json)
    metadata = read_metadata(metadata_csv, needed)
    jobs, missing = [], []
    for videoid, relative in sorted(needed.items()):
        row = metadata.get(videoid)
        if row is None or not row.get("contentUrl"):
            missing.append(videoid)
            continue
        path = relative if layout == "folder" else os.path.basename(relative)
        jobs.append(VideoJob(videoid=videoid, url=row["contentUrl"], relative_path=path))
    return jobs, missing


def check_reachable(url: str, timeout: float = 10.0) -> None:
    """Raises `OfflineError` when `url`'s host cannot be reached (any HTTP answer, even an error, is fine)."""
    parsed = urllib.parse.urlsplit(url)
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except (urllib.error.HTTPError, ValueError):
        return  # the server answered, or the URL itself is malformed: that video's download reports it
    except (urllib.error.URLError, socket.timeout, OSError) as error:
        reason = getattr(error, "reason", error)
        raise OfflineError(
            f"Cannot reach {parsed.scheme}://{parsed.netloc} ({reason}). Check the network connection, proxy "
            f"(HTTPS_PROXY) or firewall; already downloaded videos are kept and skipped on the next run."
        ) from error


class DownloadError(OSError):
    """A video could not be downloaded after `attempts` tries; the message has the URL and the last error."""

    def __init__(self, url: str, attempts: int, error: BaseException):
        super().__init__(f"{url}: {type(error).__name__}: {error} (after {attempts} attempt(s))")
        self.url, self.attempts, self.error = url, attempts, error


def _is_retryable(error: BaseException) -> bool:
    """Server busy/failing or connection trouble: worth retrying. A definite HTTP answer (404, 403, ...) is not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in _RETRY_STATUS
    return isinstance(error, (urllib.error.URLError, socket.timeout, OSError))


def download_file(url: str, destination: Path, retries: int = 3, backoff: float = 1.0, timeout: float = 60.0) -> int:
    """Downloads `url` to `destination` via `destination.part`; returns the number of attempts used.

    Retries connection errors and retryable HTTP statuses up to `retries` times, sleeping `backoff * 2**k` seconds
    between attempts; other HTTP errors (404, 403, ...) fail at once. Raises `DownloadError` when it gives up.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    for attempt in range(1, retries + 2):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
            if partial.stat().st_size == 0:
                raise urllib.error.URLError(f"{url} returned an empty body")
            os.replace(partial, destination)
            return attempt
        except Exception as error:  # noqa: BLE001 - any failure of one video (even a malformed URL) is reported
            if attempt > retries or not _is_retryable(error):
                partial.unlink(missing_ok=True)
                raise DownloadError(url, attempt, error) from error
        time.sleep(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # the loop returns or raises


def download_videos(
    jobs: list[VideoJob],
    output_dir: str | os.PathLike,
    *,
    num_threads: int = 16,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> DownloadReport:
    """Downloads `jobs` into `output_dir`, skipping files that exist (non-empty); returns the report.

    Raises `OfflineError` before starting when the first URL's host cannot be reached.
    """
    output_dir = Path(output_dir)
    report = DownloadReport(needed=len(jobs))
    todo = []
    for job in jobs:
        path = output_dir / job.relative_path
        if path.is_file() and path.stat().st_size > 0:
            report.skipped_existing += 1
        else:
            todo.append(job)
    if not todo:
        return report
    check_reachable(todo[0].url, timeout=min(timeout, 10.0))

    def fetch(job: VideoJob) -> int:
        return download_file(job.url, output_dir / job.relative_path, retries=retries, backoff=backoff, timeout=timeout)

    with ThreadPoolExecutor(max_workers=num_threads) as pool, progress_bar(
        total=len(todo), desc="downloading", unit="video"
    ) as bar:
        futures = {pool.submit(fetch, job): job for job in todo}
        for future in as_completed(futures):
            job = futures[future]
            try:
                future.result()
                report.downloaded += 1
            except DownloadError as error:
                report.failed[job.videoid] = {"url": job.url, "error": f"{type(error.error).__name__}: {error.error}",
                                              "attempts": error.attempts}
            bar.update(1)
    return report


def download_webvid(
    videochat_json: str | os.PathLike,
    metadata_csv: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layout: str = "folder",
    failures_json: str | os.PathLike | None = None,
    **download_options,
) -> DownloadReport:
    """Plans and runs the download of every video `videochat_json` needs; writes failures to `failures_json`
    (default `<output_dir>/download_failures.json`) when there are any. Options go to `download_videos`."""
    jobs, missing = plan_downloads(videochat_json, metadata_csv, layout=layout)
    report = download_videos(jobs, output_dir, **download_options)
    report.needed += len(missing)
    report.missing_in_metadata = missing
    failures_path = Path(failures_json) if failures_json is not None else Path(output_dir) / "download_failures.json"
    if report.failed or missing:
        failures_path.parent.mkdir(parents=True, exist_ok=True)
        failures_path.write_text(json.dumps(
            {"failed": report.failed, "missing_in_metadata": missing}, indent=2, sort_keys=True))
    elif failures_path.exists():
        failures_path.unlink()  # a clean re-run: no stale failure list
    return report
