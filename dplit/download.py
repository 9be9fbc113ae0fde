"""Downloads and archive extraction with a progress bar, written atomically: a temporary file in the target folder,
renamed over the target only when complete, so an interrupted transfer never leaves a partial file under the final
name. Shared by the dataset and embedding loaders."""

from __future__ import annotations

import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20


def open_url(url: str, timeout: float = 60) -> Any:
    """The network seam (tests replace it, or ``urllib.request.urlopen``, to serve bytes offline)."""
    return urllib.request.urlopen(url, timeout=timeout)


def stream_to_file(
    src: IO[bytes],
    dest: str | Path,
    total: int | None = None,
    desc: str | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Copies ``src`` into ``dest`` atomically, with a tqdm progress bar; ``check`` may vet the complete temporary
    file (raising ``OSError``) before it takes the final name.

    Raises:
        OSError: when fewer than ``total`` bytes arrive or ``check`` fails (``dest`` is then left untouched).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        done = 0
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name) as bar:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        if total is not None and done != total:
            raise OSError(f"got {done} of {total} bytes")
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def download(url: str, dest: str | Path, expect_zip: bool = False) -> Path:
    """Downloads ``url`` to ``dest`` (see :func:`stream_to_file`).

    Raises:
        OSError: network failure, short transfer, or (``expect_zip``) a file that is not a zip archive; ``dest`` is
            then left untouched. Callers add what the user can do instead.
    """
    with open_url(url, timeout=60) as response:
        length = getattr(response, "headers", {}).get("Content-Length")
        return stream_to_file(response, dest, int(length) if length else None, check=_is_zip if expect_zip else None)


def _is_zip(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise OSError("the downloaded file is not a zip archive")


__all__ = ["download", "open_url", "stream_to_file"]
