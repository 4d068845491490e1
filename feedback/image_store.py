"""Where generated PNGs live: any fsspec URL (`file://` by default, `s3://`, `gs://`, `memory://` ...).

The service writes each image here before it answers, and events carry the returned URI; the snapshot
writer copies the images of a snapshot out of the store. `put` is durable before it returns: on a local
file system the bytes are fsync'd and renamed into place (a crash never leaves a torn PNG under the final
name); object stores are durable once their PUT succeeds.
"""

import re
from pathlib import Path

import fsspec

from alignloop.feedback.config import default_image_store_url
from alignloop.durable import make_dirs_durably, write_durably

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # as alignloop.events.Id: no path separators


class ImageStore:
    def __init__(self, url: str | None = None):
        self.url = (url or default_image_store_url()).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._local = "file" in _protocols(self.fs)
        if self._local:
            make_dirs_durably(Path(self.root))

    def uri(self, image_id: str) -> str:
        """The URI `put(image_id, ...)` returns; two-character fan-out keeps directories small."""
        if not _IMAGE_ID.match(image_id):
            raise ValueError(f"image_id must match {_IMAGE_ID.pattern}; got {image_id!r}")
        return f"{self.url}/{image_id[:2]}/{image_id}.png"

    def put(self, image_id: str, png: bytes) -> str:
        if not png.startswith(PNG_MAGIC):
            raise ValueError(f"image {image_id!r} is not a PNG (first bytes {png[:8]!r})")
        uri = self.uri(image_id)
        path = self._path(uri)
        if self._local:
            write_durably(Path(path), png)
        else:
            self.fs.pipe_file(path, png)
        return uri

    def get(self, uri: str) -> bytes:
        return self.fs.cat_file(self._path(uri))

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._path(uri))

    def _path(self, uri: str) -> str:
        # Only URIs inside this store are served: event payloads name URIs, and a snapshot must not be
        # talked into copying arbitrary files.
        if not uri.startswith(self.url + "/") or ".." in uri[len(self.url) :].split("/"):
            raise ValueError(f"{uri!r} is not inside the image store {self.url!r}")
        return self.root + uri[len(self.url) :]


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)
