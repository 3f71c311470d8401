"""Prepared datasets at URLs (`gs://bucket/data`, any etils.epath / fsspec filesystem).

Training reads rows by memory-mapping the token files, which an object store cannot do, so a
split is mirrored once into the local cache (`$MNEMAX_CACHE/remote/<key>/`) and read from
there, as MaxText and Levanter read from a local copy or a FUSE mount rather than by range
requests per row. The mirror's key hashes the URL and the remote `metadata.json`, so a dataset
prepared again at the same URL gets a fresh mirror. Each file is copied to a temporary name and
renamed into place, so processes of one host that mirror at the same time, or a copy that dies
half-way, never leave a short file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid

from etils import epath

from mnemax.errors import DataError
from mnemax.trainer.data.corpus import cache_root

METADATA = "metadata.json"
_COPY_CHUNK = 16 << 20


def is_url(source: str) -> bool:
    """Whether a data source names a URL (`gs://b/x`) rather than a local directory."""
    return "://" in source


def _copy(remote: epath.Path, local: pathlib.Path) -> None:
    """Copies `remote` to `local` unless it is there already (only whole copies get the name;
    a remote file shorter than its metadata says is caught when the split is opened)."""
    if local.is_file():
        return
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with remote.open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(tmp, local)
    except FileNotFoundError:
        raise DataError(
            f"{remote} is missing, though the dataset's {METADATA} lists it: the upload is "
            "incomplete; copy the whole prepared directory again."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def mirror_split(url: str, split: str) -> pathlib.Path:
    """The local mirror of `url`'s `metadata.json` and `split` files (copied if missing).

    Raises DataError naming the URL and the fix when it holds no prepared dataset.
    """
    root = epath.Path(url)
    try:
        text = (root / METADATA).read_text()
    except FileNotFoundError:
        raise DataError(
            f"{url} has no {METADATA}: it is not a prepared dataset (or its upload is "
            "incomplete). Prepare locally with `mnemax data prepare --out DIR` and copy DIR "
            f"to {url} (e.g. gcloud storage cp -r DIR {url})."
        ) from None
    key = hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()[:16]
    local = cache_root() / "remote" / key
    (local / split).mkdir(parents=True, exist_ok=True)
    try:
        files = [entry["file"] for entry in json.loads(text)["splits"][split]["files"]]
    except (ValueError, KeyError, TypeError):
        files = []  # read_metadata, on the mirror, names what is wrong
    for name in files:
        _copy(root / split / name, local / split / name)
    _copy(root / METADATA, local / METADATA)
    return local
