"""The TwitterAAE full-corpus archive: where the raw corpus lies under a data root, and fetching it (download of
``TwitterAAE-full-v1.zip`` and extraction of its ``twitteraae_all`` member, both atomic with a progress bar)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from dplit.download import download, stream_to_file

ARCHIVE_URL = "http://slanglab.cs.umass.edu/TwitterAAE/TwitterAAE-full-v1.zip"  # linked from the TwitterAAE page
ARCHIVE_NAME = "TwitterAAE-full-v1.zip"  # several GB (59M tweets)
RAW_NAME = "twitteraae_all"  # the archive member TwitterAAE-full-v1/twitteraae_all


def find_raw_corpus(root: str | Path) -> Path | None:
    """``root/twitteraae_all``, else ``root/TwitterAAE-full-v1/twitteraae_all`` (the unzipped archive), else None."""
    root = Path(root)
    for path in (root / RAW_NAME, root / Path(ARCHIVE_NAME).stem / RAW_NAME):
        if path.is_file():
            return path
    return None


def download_archive(root: str | Path, url: str = ARCHIVE_URL) -> Path:
    """Downloads ``TwitterAAE-full-v1.zip`` into ``root`` (atomically: a partial download never has the final name).

    Raises:
        RuntimeError: when the download fails (the message says how to place the file by hand).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / ARCHIVE_NAME
    try:
        return download(url, dest)
    except OSError as err:  # URLError, HTTPError and socket timeouts are OSErrors
        raise RuntimeError(
            f"Downloading {url} to {dest} failed: {err}. Without network access, fetch {ARCHIVE_NAME} from "
            f"http://slanglab.cs.umass.edu/TwitterAAE/ elsewhere and put it, or its {RAW_NAME}, in {root}."
        ) from err


def extract_raw_corpus(archive: str | Path, root: str | Path) -> Path:
    """Extracts only the ``twitteraae_all`` member of the archive to ``root/twitteraae_all`` (atomically).

    Raises:
        ValueError: when the archive is not a zip file or holds no ``twitteraae_all``.
    """
    archive, root = Path(archive), Path(root)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [i for i in zf.infolist() if Path(i.filename).name == RAW_NAME and not i.is_dir()]
            if not members:
                names = ", ".join(zf.namelist()[:10])
                raise ValueError(f"{archive} holds no {RAW_NAME} (members: {names}); is it {ARCHIVE_NAME}?")
            info = min(members, key=lambda i: len(i.filename))  # TwitterAAE-full-v1/twitteraae_all
            with zf.open(info) as src:
                return stream_to_file(src, root / RAW_NAME, info.file_size, f"extracting {RAW_NAME}")
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive} is not a valid zip file ({err}); delete it and download it again") from err


def fetch_raw_corpus(root: str | Path, download: bool = True, url: str = ARCHIVE_URL) -> Path:
    """The raw corpus under ``root``: found as is, else extracted from ``root/TwitterAAE-full-v1.zip``, else
    downloaded (when ``download``) and extracted. The archive is kept.

    Raises:
        FileNotFoundError: when neither the corpus nor the archive is in ``root`` and ``download`` is false.
    """
    found = find_raw_corpus(root)
    if found is not None:
        return found
    archive = Path(root) / ARCHIVE_NAME
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(f"neither {RAW_NAME} nor {ARCHIVE_NAME} is in {root}; download it from {url}")
        download_archive(root, url)
    return extract_raw_corpus(archive, root)


__all__ = [
    "ARCHIVE_NAME",
    "ARCHIVE_URL",
    "RAW_NAME",
    "download_archive",
    "extract_raw_corpus",
    "fetch_raw_corpus",
    "find_raw_corpus",
]
