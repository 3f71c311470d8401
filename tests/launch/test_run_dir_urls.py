"""Run directories given as URLs (gs://bucket/run): the files the loop writes go through
etils.epath, tested against a local directory standing in for the bucket (an fsspec filesystem
registered for gs://, so no network and no gcsfs are needed). Checkpoints in a bucket are
orbax's (tensorstore's gcs driver), which needs the real service: not tested here."""

import json
import sys

import fsspec  # noqa: F401  (loads fsspec.registry)
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from mnemax.trainer.events import EventLog, read_events
from mnemax.trainer.loop import _make_run_dir
from mnemax.trainer.metrics import MetricsWriter

PROTOCOLS = ("gs", "gcs")  # epath asks fsspec for "gcs" when given gs:// paths


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A local directory that gs:// paths resolve into: gs://b/x is tmp_path/b/x."""

    class LocalBucket(DirFileSystem):
        protocol = PROTOCOLS
        cachable = False  # fsspec caches instances by arguments: this one's root is per test

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(tmp_path), fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for scheme in PROTOCOLS:
                path = path.removeprefix(f"{scheme}://")
            return path

    registry = sys.modules["fsspec.registry"]._registry  # fsspec.registry is a read-only view
    for protocol in PROTOCOLS:
        monkeypatch.setitem(registry, protocol, LocalBucket)  # undone after the test
    # epath keeps the filesystem it got for a protocol: drop it, or a test gets the bucket of
    # the one before.
    cached = epath_backend._FileSystemSpecBackend._get_filesystem
    cached.cache_clear()
    yield tmp_path
    cached.cache_clear()


def test_run_dir_files_go_to_the_bucket(bucket):
    run_dir = _make_run_dir("gs://b/runs/tiny")
    assert str(run_dir) == "gs://b/runs/tiny"  # not /cwd/gs:/b/runs/tiny
    assert (bucket / "b" / "runs" / "tiny").is_dir()

    events = EventLog(run_dir)
    events.record("start", 0, processes=1)
    events.record("preemption", 7, reason="SIGTERM received")
    assert [(e["kind"], e["step"]) for e in read_events(run_dir)] == [("start", 0),
                                                                      ("preemption", 7)]
    assert (bucket / "b" / "runs" / "tiny" / "events.jsonl").exists()

    writer = MetricsWriter(run_dir, trackers=())
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 5.0 - step})
    writer.truncate_after(2)
    lines = (bucket / "b" / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}]

    quiet = MetricsWriter(run_dir, trackers=(), enabled=False)  # not process 0
    quiet.write({"step": 9, "loss": 0.0})
    assert len((bucket / "b" / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()) == 2



def test_data_source_in_a_bucket_gives_the_batches_of_the_local_copy(bucket, tmp_path,
                                                                     monkeypatch):
    import dataclasses

    import numpy as np

    from mnemax.errors import DataError
    from mnemax.trainer.data import DataConfig, eval_batches, train_iterator
    from mnemax.trainer.data.prepare import prepare

    monkeypatch.setenv("MNEMAX_CACHE", str(tmp_path / "cache"))  # the mirror goes here
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(["ab", "cde", "f"], 300))})
                              + "\n" for _ in range(8)))
    prepare(str(corpus), "bytes", bucket / "b" / "data", val_percent=25)  # gs://b/data
    local = DataConfig(source=str(bucket / "b" / "data"), seq_len=16, global_batch=4)
    remote = dataclasses.replace(local, source="gs://b/data")

    got, want = train_iterator(remote), train_iterator(local)
    for _ in range(5):
        np.testing.assert_array_equal(next(got), next(want))
    assert got.get_state() == want.get_state()
    np.testing.assert_array_equal(eval_batches(remote, 2), eval_batches(local, 2))
    mirrors = list((tmp_path / "cache" / "remote").iterdir())
    assert len(mirrors) == 1 and (mirrors[0] / "metadata.json").is_file()
    assert not list(mirrors[0].rglob(".*tmp-*"))  # only whole copies under final names

    # A mixture may name a URL too.
    mixed = dataclasses.replace(local, mixture=f"gs://b/data:0.5,{local.source}:0.5")
    assert next(train_iterator(mixed)).shape == (4, 17)

    with pytest.raises(DataError, match=r"gs://b/nothing has no metadata\.json.*copy DIR"):
        train_iterator(dataclasses.replace(local, source="gs://b/nothing"))
