"""Download of Meta's `imagebind_huge.pth` with a progress bar, HTTP Range resume and a size check."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

IMAGEBIND_HUGE_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
_CHUNK = 1 << 20


class DownloadError(OSError):
    """The checkpoint could not be fetched (offline, HTTP error, size mismatch); the message says what to do."""


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".part")


def download_imagebind_checkpoint(
    output: str | os.PathLike,
    url: str = IMAGEBIND_HUGE_URL,
    timeout: float = 30.0,
) -> Path:
    """Downloads `url` to `output`, resuming `<output>.part` from where it stopped.

    The data goes to `<output>.part` and is renamed to `output` only once its size equals the server's
    Content-Length, so a truncated file never carries the final name. An existing complete `output` is kept. A
    progress bar is drawn while `mm_llama.progress`'s switch is on.

    Args:
        output: destination file (e.g. `checkpoints/imagebind_huge.pth`).
        url: source URL (Meta's public URL by default).
        timeout: socket timeout in seconds.

    Returns:
        The path of the complete file.

    Raises:
        DownloadError: the server cannot be reached, answers with an error, or the sizes disagree.
    """
    output = Path(output)
    partial = _partial_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    total = _remote_size(url, timeout)
    if output.exists():
        if total is None or output.stat().st_size == total:
            return output
        raise DownloadError(
            f"{str(output)!r} exists with {output.stat().st_size} bytes but {url} has {total}; "
            "delete it (or rename it to add '.part' to resume it) and run again."
        )

    done = partial.stat().st_size if partial.exists() else 0
    if total is not None and done > total:
        partial.unlink()  # larger than the remote file: not a prefix of it
        done = 0
    if total is None or done < total:
        done = _fetch(url, partial, done, total, timeout)
    if total is not None and done != total:
        raise DownloadError(
            f"Downloaded {done} bytes of {url} but the server announced {total}; run the command again to resume "
            f"{str(partial)!r}."
        )
    partial.replace(output)
    return output


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request (None when the server does not say)."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}).") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"Cannot reach {url} ({reason}). Check the network connection or proxy, or download the file elsewhere "
            "and copy it here (the converter only needs the local .pth)."
        ) from err
    return int(length) if length is not None else None


def _fetch(url: str, partial: Path, done: int, total: int | None, timeout: float) -> int:
    """Appends the bytes from offset `done` to `partial`; returns the new size."""
    from ..progress import progress_bar

    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and total is not None and done == total:  # nothing left to fetch
            return done
        raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}).") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"Cannot reach {url} ({getattr(err, 'reason', err)}); check the network.") from err
    with response:
        if done and response.status != 206:
            done = 0  # the server ignored the Range header and sends the whole file: start over
        mode = "ab" if done else "wb"
        with open(partial, mode) as sink, progress_bar(
            total=total, initial=done, unit="B", unit_scale=True, desc=partial.name
        ) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    sink.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                # The bytes received so far stay in the .part file for the next run to resume from.
                raise DownloadError(
                    f"The download of {url} broke off after {done} bytes ({err}); run again to resume."
                ) from err
    return done


__all__ = ["IMAGEBIND_HUGE_URL", "DownloadError", "download_imagebind_checkpoint"]
