"""The documents of a corpus: text files, JSON-lines, Parquet and saved Hugging Face datasets.

`resolve_inputs` turns a glob or a list of paths into `Source`s sorted by path; `read_records`
yields each source's documents as strings, in order. Formats, by file name:

- `*.jsonl` (or `*.json`, as Hugging Face names JSON lines): one document per line, its
  `text_field` (read with `pyarrow.json`);
- `*.parquet`: one document per row, its `text_field` column (read with `pyarrow.parquet`);
- a directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, every
  split): one document per row (read with `datasets.load_from_disk`);
- any other file (`.txt`, source code, ...): the whole file is one document.

Text must be UTF-8; `encoding_errors="replace"` turns undecodable bytes into U+FFFD instead of
raising a `DataError` that names the file and the record.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Literal

from mnemax.errors import DataError

EncodingErrors = Literal["strict", "replace"]
Kind = Literal["text", "jsonl", "parquet", "hf"]
_ARROW_BATCH = 1024  # Records decoded per Arrow batch.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: `path` (absolute), `rel` (path relative to the inputs' root), its format."""

    path: pathlib.Path
    rel: str
    kind: Kind


def _is_hf_dataset(path: pathlib.Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_MARKERS)


def _kind(path: pathlib.Path) -> Kind:
    if path.is_dir():
        return "hf"
    kinds: dict[str, Kind] = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    return kinds.get(path.suffix.lower(), "text")


def resolve_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Source]:
    """Expands a glob (`**` allowed), a path or a list of paths into sources sorted by `rel`.

    Directories count only when they are saved Hugging Face datasets; the root (for `rel`) is
    the deepest directory containing every input.
    """
    if isinstance(inputs, (str, os.PathLike)):
        pattern = os.path.expanduser(str(inputs))
        paths = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)]
        if not paths and not glob.has_magic(pattern):
            raise DataError(
                f"input {str(inputs)!r} does not exist: pass an existing file, a saved "
                "Hugging Face dataset directory, or a glob such as 'corpus/**/*.jsonl'."
            )
        what = f"the glob {str(inputs)!r}"
        if len(paths) == 1 and paths[0].is_dir() and not _is_hf_dataset(paths[0]):
            raise DataError(
                f"input {paths[0]} is a directory but not a dataset saved by "
                "`datasets.save_to_disk` (it has none of "
                f"{', '.join(_HF_MARKERS)}): pass a glob of its files instead, e.g. "
                f"'{paths[0]}/**/*.txt'."
            )
    else:
        paths = [pathlib.Path(p).expanduser() for p in inputs]
        missing = [str(p) for p in paths if not (p.is_file() or _is_hf_dataset(p))]
        if missing:
            raise DataError(
                f"{len(missing)} input(s) do not exist or are not files, e.g. {missing[0]}: "
                "pass existing files or saved Hugging Face dataset directories, or a glob such "
                "as 'corpus/**/*.txt'."
            )
        what = "the input list"
    found = sorted({p.resolve() for p in paths if p.is_file() or _is_hf_dataset(p)})
    if not found:
        raise DataError(
            f"{what} matches no files: check the path (quote the glob so the shell does not "
            "expand it, and use '**' to match subdirectories, e.g. 'corpus/**/*.txt')."
        )
    if len(found) == 1:
        root = found[0].parent
    else:
        root = pathlib.Path(os.path.commonpath([str(p.parent) for p in found]))
    sources = [Source(p, p.relative_to(root).as_posix(), _kind(p)) for p in found]
    return sorted(sources, key=lambda s: s.rel)


def _decode(data: bytes, errors: EncodingErrors, where: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}): "
            "convert the file to UTF-8, or pass --encoding-errors replace to read undecodable "
            "bytes as U+FFFD."
        ) from None


def _arrow_texts(
    batches: Iterator, path: pathlib.Path, field: str, errors: EncodingErrors
) -> Iterator[str]:
    """The `field` strings of Arrow record batches (or tables), numbering records from 0."""
    import pyarrow as pa

    index = 0
    for batch in batches:
        if field not in batch.schema.names:
            raise DataError(
                f"{path} has no field {field!r} (it has {', '.join(batch.schema.names)}): pass "
                "--text-field with the name of the field that holds the text."
            )
        column = batch.column(field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise DataError(
                f"field {field!r} of {path} holds {column.type}, not text: pass --text-field "
                "with the name of the field that holds the text."
            )
        raw = column.cast(pa.large_binary()).to_pylist()  # Bytes: decoding is ours to check.
        for value in raw:
            if value is None:
                raise DataError(
                    f"record {index} of {path} has no {field!r} (null or missing): remove the "
                    "record, or pass --text-field with a field every record has."
                )
            yield _decode(value, errors, f"record {index} of {path}")
            index += 1
    if index == 0:
        raise DataError(f"{path} holds no records: remove it from the inputs.")


def _jsonl_batches(path: pathlib.Path) -> Iterator:
    import pyarrow as pa
    import pyarrow.json as pa_json

    try:
        reader = pa_json.open_json(path)
        yield from reader
    except pa.ArrowInvalid as e:
        if path.stat().st_size == 0:
            return
        raise DataError(
            f"{path} is not JSON lines ({e}): write one JSON object per line, e.g. "
            '{"text": "..."}.'
        ) from None


def _parquet_batches(path: pathlib.Path, field: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a Parquet file ({e}): rewrite it or remove it.") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise DataError(
            f"{path} has no field {field!r} (it has {', '.join(names)}): pass --text-field "
            "with the name of the field that holds the text."
        )
    yield from parquet.iter_batches(batch_size=_ARROW_BATCH, columns=[field])


def _hf_batches(path: pathlib.Path) -> Iterator:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) \
        else [loaded]
    for part in parts:
        yield from part.with_format("arrow").iter(batch_size=_ARROW_BATCH)


def read_records(
    source: Source, *, text_field: str = "text", encoding_errors: EncodingErrors = "strict"
) -> Iterator[str]:
    """The documents of `source`, in order; raises DataError naming the file and the fix."""
    if source.kind == "text":
        data = source.path.read_bytes()
        if not data:
            raise DataError(f"{source.path} is empty: remove it from the inputs.")
        yield _decode(data, encoding_errors, str(source.path))
        return
    batches = {
        "jsonl": lambda: _jsonl_batches(source.path),
        "parquet": lambda: _parquet_batches(source.path, text_field),
        "hf": lambda: _hf_batches(source.path),
    }[source.kind]()
    yield from _arrow_texts(batches, source.path, text_field, encoding_errors)
