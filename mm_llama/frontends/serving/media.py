"""Request messages -> the HF chat conversation the library generates from, with every media item embedded.

Media come as `data:` URLs (`image_url`, `video_url`), base64 `input_audio`, or local files (`file://` URLs or
absolute paths) from the folders the server was started with (`--allowed_media_dir`; none by default, so a client
cannot make the server read its files). Remote http(s) URLs are not fetched.

Every item's bytes are read once (size-checked) and written to a private scratch folder under a name made of their
SHA-256, then embedded by the library's `MediaEmbedder` and deleted. The embedder's cache is keyed by that path, so
equal bytes are embedded once and a changed local file is never answered from a stale cache entry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from ...generation import MediaEmbedder
from ...imagebind.processing_imagebind import MediaLoadError
from .schema import (
    ApiError,
    ImageURLPart,
    InputAudioPart,
    Message,
    TextPart,
    UserMessage,
    VideoURLPart,
)

PART_MEDIA_TYPE = {"image_url": "image", "video_url": "video", "input_audio": "audio"}
MAX_MEDIA_PER_MESSAGE = 1  # the prompt format has one media placeholder per user turn


class MediaResolver:
    """Turns validated request messages into a conversation whose media parts carry their embeddings.

    Args:
        embedder: the server's `MediaEmbedder` (its cache is shared by every request; a lock serialises its use).
        allowed_dirs: folders whose files requests may name; empty: local paths are refused.
        max_media_bytes: largest media item (decoded bytes) accepted.
    """

    def __init__(self, embedder: MediaEmbedder, allowed_dirs: Sequence[str | Path] = (),
                 max_media_bytes: int = 20 * 2**20):
        self.embedder = embedder
        self.allowed_dirs = [Path(folder).resolve() for folder in allowed_dirs]
        for folder in self.allowed_dirs:
            if not folder.is_dir():
                raise FileNotFoundError(f"--allowed_media_dir {str(folder)!r} is not a folder.")
        self.max_media_bytes = max_media_bytes
        self.scratch = Path(tempfile.mkdtemp(prefix="mm-llama-serve-"))
        self._lock = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def conversation(self, messages: Sequence[Message]) -> list[dict]:
        """HF chat messages (`{"role", "content"}`; user media parts `{"type", "embeds"}`). Raises ApiError (4xx)
        naming the message for unusable media."""
        conversation = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            role = "system" if message.role == "developer" else message.role
            if not isinstance(message, UserMessage) or isinstance(message.content, str):
                conversation.append({"role": role, "content": _text(message.content)})
                continue
            media = [part for part in message.content if not isinstance(part, TextPart)]
            if len(media) > MAX_MEDIA_PER_MESSAGE:
                raise ApiError(400, f"{where} has {len(media)} media parts; this model takes at most "
                                    f"{MAX_MEDIA_PER_MESSAGE} image, video or audio per user message. Send each in a "
                                    "message of its own.", code="too_many_media", param=where)
            content: list[dict] = [{"type": "text", "text": _text(message.content)}]
            content += [self.embedded_part(part, f"{where}.{part.type}") for part in media]
            conversation.append({"role": "user", "content": content})
        return conversation

    def embedded_part(self, part: ImageURLPart | VideoURLPart | InputAudioPart, where: str) -> dict:
        """One media content part -> `{"type": "image"|"video"|"audio", "embeds": [tokens_per_media, dim]}`."""
        media_type = PART_MEDIA_TYPE[part.type]
        if isinstance(part, InputAudioPart):
            data, suffix = self._base64(part.input_audio.data, where), "." + part.input_audio.format.lower().strip(".")
        else:
            data, suffix = self._read_url((part.image_url if isinstance(part, ImageURLPart) else part.video_url).url,
                                          media_type, where)
        path = self.scratch / (hashlib.sha256(data).hexdigest() + suffix)
        try:
            with self._lock:  # the embedder's cache is not thread-safe
                path.write_bytes(data)
                embeds = self.embedder.embed({"type": media_type, "path": str(path)})
        except (MediaLoadError, ValueError, OSError) as error:
            message = str(error).replace(repr(str(path)), where).replace(str(path), where)
            raise ApiError(400, message, code="invalid_media", param=where) from error
        finally:
            path.unlink(missing_ok=True)
        return {"type": media_type, "embeds": embeds}

    def _read_url(self, url: str, media_type: str, where: str) -> tuple[bytes, str]:
        """The bytes a URL names and a file suffix for them."""
        if url.startswith("data:"):
            header, comma, payload = url[5:].partition(",")
            mime, *params = header.split(";")
            if not comma or "base64" not in params:
                raise ApiError(400, f"{where}: a data URL must be base64, as data:{media_type}/...;base64,<data>.",
                               code="invalid_media", param=where)
            if mime.split("/")[0] != media_type:
                raise ApiError(400, f"{where}: unsupported media type {mime or '(none)'!r} in a {media_type} part; "
                                    f"send a {media_type}/* data URL (e.g. data:{media_type}/"
                                    f"{'png' if media_type == 'image' else 'mp4'};base64,...).",
                               code="unsupported_media_type", param=where)
            return self._base64(payload, where), mimetypes.guess_extension(mime) or ""
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            raise ApiError(400, f"{where}: remote URLs are not fetched by this server; send the media as a "
                                "base64 data: URL.", code="invalid_media", param=where)
        if scheme == "file":
            url = unquote(urlparse(url).path)
        elif scheme or not url.startswith("/"):
            raise ApiError(400, f"{where}: {url[:60]!r} is neither a data: URL nor an absolute file path.",
                           code="invalid_media", param=where)
        return self._read_local(Path(url), where), Path(url).suffix

    def _read_local(self, path: Path, where: str) -> bytes:
        if not self.allowed_dirs:
            raise ApiError(403, f"{where}: local file paths are off on this server; send a base64 data: URL (or "
                                "start the server with --allowed_media_dir FOLDER).", code="local_media_disabled",
                           param=where)
        resolved = path.resolve()  # symlinks and '..' resolved before the check, so neither can leave the folders
        if not any(resolved.is_relative_to(folder) for folder in self.allowed_dirs):
            raise ApiError(403, f"{where}: {str(path)!r} is outside the folders this server may read "
                                "(--allowed_media_dir).", code="local_media_forbidden", param=where)
        if not resolved.is_file():
            raise ApiError(400, f"{where}: {str(path)!r} does not exist.", code="invalid_media", param=where)
        if resolved.stat().st_size > self.max_media_bytes:
            raise self._too_large(resolved.stat().st_size, where)
        return resolved.read_bytes()

    def _base64(self, payload: str, where: str) -> bytes:
        if len(payload) * 3 // 4 > self.max_media_bytes + 2:  # checked before decoding anything
            raise self._too_large(len(payload) * 3 // 4, where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, f"{where}: the media data is not valid base64 ({error}).", code="invalid_media",
                           param=where) from error
        if len(data) > self.max_media_bytes:
            raise self._too_large(len(data), where)
        return data

    def _too_large(self, size: int, where: str) -> ApiError:
        return ApiError(413, f"{where}: the media item is {size / 2**20:.1f} MiB; this server accepts at most "
                             f"{self.max_media_bytes / 2**20:.1f} MiB per item (--max_media_mb).",
                        code="media_too_large", param=where)


def _text(content: str | list | None) -> str:
    """A message's text: the string, or its text parts joined by spaces (as the processor joins them)."""
    if content is None or isinstance(content, str):
        return content or ""
    return " ".join(part.text for part in content if isinstance(part, TextPart))


__all__ = ["MAX_MEDIA_PER_MESSAGE", "MediaResolver"]
