"""The built-in corpus: the running Python's standard library, prepared once and cached.

It needs no download, is ~30 MB of text (code plus a few docs) and is the same on every machine
with the same Python version, which makes it a good default for smoke tests and small runs.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig

from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.prepare import FORMAT_VERSION, write_dataset
from mnemax.trainer.data.sources import Source

_SUFFIXES = (".py", ".txt", ".rst")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> pathlib.Path:
    """The directory of the running Python's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_corpus_files() -> list[pathlib.Path]:
    """`.py`, `.txt` and `.rst` files of the standard library, sorted by relative path.

    Installed packages (`site-packages`, `dist-packages`) and `__pycache__` are excluded; the
    stdlib's own `test` directories are kept, they are just more text.
    """
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        found.extend(pathlib.Path(dirpath, f) for f in filenames if f.endswith(_SUFFIXES))
    files = [f for f in found if f.is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def cache_root() -> pathlib.Path:
    """`$MNEMAX_CACHE`, else `~/.cache/mnemax`."""
    return pathlib.Path(os.environ.get("MNEMAX_CACHE", "~/.cache/mnemax")).expanduser()


def stdlib_dataset_name(cfg: DataConfig) -> str:
    """E.g. `stdlib-py3.11-bytes-v2.0-f2`; a tokenizer.json is named by its content hash.

    No seq_len: rows are cut at load time, so every seq_len shares one cached token stream.
    `f2` is the format version, so a stream of another format is never mistaken for this one.
    """
    if cfg.tokenizer == "bytes":
        tok = "bytes"
    else:
        path = pathlib.Path(cfg.tokenizer).expanduser()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "x"
        tok = f"{path.stem}-{digest}"
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return f"stdlib-{py}-{tok}-v{cfg.val_percent}-f{FORMAT_VERSION}"


def ensure_stdlib_dataset(cfg: DataConfig) -> pathlib.Path:
    """Returns the cached stdlib dataset directory for `cfg`, building it on first use.

    Safe when several processes race: each builds into its own temporary directory and the
    first rename wins; the others use the winner's directory.
    """
    out = cache_root() / stdlib_dataset_name(cfg)
    if (out / "metadata.json").is_file():
        return out
    root = stdlib_root()
    # Empty files (many __init__.py) are no documents; prepare refuses them in user corpora.
    sources = [Source(f, f.relative_to(root).as_posix(), "text")
               for f in stdlib_corpus_files() if f.stat().st_size]
    write_dataset(
        sources,
        tokenizer=cfg.tokenizer,
        out_dir=out,
        val_percent=cfg.val_percent,
        source=f"stdlib:{root}",
        encoding_errors="replace",  # A few stdlib test files are deliberately not UTF-8.
        progress=False,
    )
    return out
