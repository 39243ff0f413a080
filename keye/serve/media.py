"""OpenAI chat messages -> keye chat messages: content parts resolved to media files the processor reads.

Parts: ``{"type": "text"}``, ``{"type": "image_url", "image_url": {"url"}}``, ``{"type": "video_url", "video_url":
{"url"}}``. A url is ``data:<mime>;base64,<data>`` (written once to the media folder, named by its content's
SHA-256, so the same video sent twice is one file and one cache key), ``data:video/jpeg;base64,<f1>,<f2>,...`` (a
list of JPEG frames, as vLLM takes it: written as the frame images of one video), a local path / ``file://`` url
under ``allowed_local`` (symlinks resolved first; nothing outside it), or an http(s) url whose host is one of
``allowed_domains`` (none by default; no redirects followed, at most ``max_bytes`` read).

Every refusal is an `APIError` naming the content part (``messages[i].content[j]``) and why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["APIError", "MediaResolver"]

_SUFFIX = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
}


class APIError(Exception):
    """An OpenAI error object: HTTP ``status`` and ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 and status != 429 else "server_error"
        if status == 429:
            self.type = "rate_limit_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class MediaResolver:
    """Resolves content parts into files under ``folder``; ``max_bytes`` caps one decoded upload."""

    folder: Path
    allowed_local: Path | None = None
    max_bytes: int = 200 << 20
    allowed_domains: list[str] = field(default_factory=list)
    timeout: float = 30.0

    def messages(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """keye messages (content parts ``text`` / ``image`` / ``video`` with file paths) and the SHA-256 of every
        medium in order (the prefix cache's key)."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        out, keys = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(
                    400, f"messages[{i}]: role must be system, user or assistant", param="messages"
                )
            content = m.get("content")
            if isinstance(content, str) or content is None:
                out.append({"role": m["role"], "content": content or ""})
                continue
            if not isinstance(content, list):
                raise APIError(
                    400, f"messages[{i}].content must be a string or a list of parts", param="messages"
                )
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind in ("image_url", "video_url"):
                    url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else None
                    if not isinstance(url, str) or not url:
                        raise APIError(400, f"{where}: {kind}.url is missing", param=where)
                    path, key = self._resolve(url, kind[: -len("_url")], where)
                    media = kind[: -len("_url")]
                    parts.append({"type": media, media: str(path)})
                    keys.append(key)
                else:
                    raise APIError(400, f"{where}: unsupported content part type {kind!r}", param=where)
            out.append({"role": m["role"], "content": parts})
        return out, keys

    # ---------------------------------------------------------------------------------------------------- urls
    def _resolve(self, url: str, media: str, where: str) -> tuple[Path, str]:
        if url.startswith("data:"):
            return self._data_url(url, media, where)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return self._download(url, parsed.hostname or "", media, where)
        if parsed.scheme not in ("", "file"):
            raise APIError(400, f"{where}: unsupported url scheme {parsed.scheme!r}", param=where)
        if self.allowed_local is None:
            raise APIError(
                400,
                f"{where}: local paths are not allowed (start with --allowed-local-media-path)",
                param=where,
            )
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).resolve()
        root = self.allowed_local.resolve()
        if not path.is_relative_to(root):
            raise APIError(
                400, f"{where}: {path.name or url} is outside the allowed media folder", param=where
            )
        if not path.is_file():
            raise APIError(400, f"{where}: no such file {path.name}", param=where)
        if path.stat().st_size > self.max_bytes:
            raise APIError(413, f"{where}: file larger than {self.max_bytes >> 20} MB", param=where)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return path, digest.hexdigest()

    def _data_url(self, url: str, media: str, where: str) -> tuple[Path, str]:
        header, sep, payload = url[len("data:") :].partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data url must be data:<mime>;base64,<data>", param=where)
        mime = header[: -len(";base64")].lower()
        if len(payload) * 3 // 4 > self.max_bytes:
            raise APIError(413, f"{where}: upload larger than {self.max_bytes >> 20} MB", param=where)
        chunks = payload.split(",") if media == "video" and mime == "video/jpeg" else [payload]
        try:
            blobs = [base64.b64decode(c, validate=True) for c in chunks]
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the base64 data is corrupt", param=where) from None
        if not all(blobs):
            raise APIError(400, f"{where}: empty data", param=where)
        key = hashlib.sha256(b"\0".join(blobs)).hexdigest()
        if media == "video" and mime == "video/jpeg":
            return self._frame_list(blobs, key, where), key
        suffix = _SUFFIX.get(mime)
        if suffix is None or not mime.startswith(media + "/"):
            raise APIError(400, f"{where}: {mime or 'no type'} is not a supported {media} type", param=where)
        return self._store(blobs[0], key, suffix), key

    def _download(self, url: str, host: str, media: str, where: str) -> tuple[Path, str]:
        if host.lower() not in {d.lower() for d in self.allowed_domains}:
            raise APIError(
                400,
                f"{where}: media from {host or url} is not allowed (see --allowed-media-domains)",
                param=where,
            )
        import httpx

        data = bytearray()
        try:
            with httpx.stream("GET", url, timeout=self.timeout, follow_redirects=False) as r:
                if r.status_code != 200:
                    raise APIError(400, f"{where}: fetching the url gave HTTP {r.status_code}", param=where)
                mime = r.headers.get("content-type", "").split(";")[0].strip().lower()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise APIError(
                            413, f"{where}: download larger than {self.max_bytes >> 20} MB", param=where
                        )
        except httpx.HTTPError as e:
            raise APIError(
                400, f"{where}: fetching the url failed: {type(e).__name__}", param=where
            ) from None
        suffix = _SUFFIX.get(mime) or Path(urlparse(url).path).suffix.lower()
        if suffix not in {v for k, v in _SUFFIX.items() if k.startswith(media + "/")}:
            raise APIError(400, f"{where}: {mime or 'no type'} is not a supported {media} type", param=where)
        key = hashlib.sha256(data).hexdigest()
        return self._store(bytes(data), key, suffix), key

    def _store(self, blob: bytes, key: str, suffix: str) -> Path:
        """Write ``blob`` once as ``<key><suffix>`` in the media folder."""
        path = self.folder / f"{key}{suffix}"
        if not path.exists():
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        return path

    def _frame_list(self, frames: list[bytes], key: str, where: str) -> Path:
        """JPEG frames as one video file the decoder reads (1 frame a second, near-lossless h264), so Slow-Fast plans
        it like any other video."""
        import io

        import numpy as np
        from PIL import Image, UnidentifiedImageError

        from keye.encoders.video import write_video

        path = self.folder / f"{key}.mp4"
        if path.exists():
            return path
        try:
            arrays = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames]
        except (UnidentifiedImageError, OSError):
            raise APIError(400, f"{where}: a frame of the list is not a JPEG image", param=where) from None
        if len({a.shape for a in arrays}) != 1:
            raise APIError(400, f"{where}: the frames differ in size", param=where)
        tmp = self.folder / f"{key}.tmp.mp4"
        write_video(tmp, arrays, fps=1.0, crf=0)
        tmp.replace(path)
        return path
