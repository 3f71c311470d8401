"""Run directories given as URLs (gs://bucket/run): the files the loop writes go through
etils.epath, tested against a local directory standing in for the bucket (an fsspec filesystem
registered for gs://, so no network and no gcsfs are needed). Checkpoints in a bucket are
orbax's (tensorstore's gcs driver), which needs the real service: not tested here."""

import json
import sys

import fsspec  # noqa: F401  (loads fsspec.registry)
import pytest
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
    return tmp_path


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

