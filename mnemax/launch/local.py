"""`mnemax launch local`: a multi-process job of N CPU processes on this machine.

Each process is `mnemax train` with `--coordinator 127.0.0.1:PORT --num-processes N
--process-id i` and its own `devices / N` fake CPU devices (XLA's host device count), the
processes talking through JAX's distributed runtime and gloo collectives: the same code path as
N hosts of a cluster, for tests and for trying multi-host behaviour without one.

The launcher forwards SIGINT and SIGTERM to every process (each process runs in its own
session, so a terminal's Ctrl-C reaches them once, through here), prints process 0's output as
it is and the others' prefixed with `[process i]`, and returns the worst exit code (a process
killed by signal s counts as 128 + s). A process that is gone while others run makes them stop
through the runtime's heartbeat timeout; should they not stop within `grace_s` more, they are
killed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from mnemax.errors import ConfigError
from mnemax.launch.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")
# Lines every process prints that say nothing to a user: gloo's connection report and the
# addresses of a C++ stack trace that the distributed runtime's abort prints after its message.
_NOISE = re.compile(r"^(\[Gloo\] Rank \d+ is connected|\s+@\s+0x[0-9a-f]+ )")


def free_port() -> int:
    """A TCP port nothing listens on right now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process: CPU only, `devices_per_process` fake devices."""
    env = dict(os.environ if base is None else base)
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                        f"{devices_per_process}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed
    env.pop("MNEMAX_COORDINATOR", None)  # the flags say where each process sits
    return env


def exit_code(returncode: int) -> int:
    """A shell's exit status for a child's return code (killed by signal s: 128 + s)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _relay(stream: IO[str], prefix: str, out: IO[str]) -> None:
    for line in stream:
        if not _NOISE.match(line):
            out.write(prefix + line)
            out.flush()


def launch_local(processes: int, train_args: Sequence[str], *, devices: int = 8,
                 heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
                 grace_s: float = 60.0, out: IO[str] | None = None) -> int:
    """Runs `mnemax train *train_args` as `processes` CPU processes; returns the worst exit
    code. `devices` fake CPU devices in all, `devices / processes` per process."""
    out = out or sys.stdout
    if processes < 1:
        raise ConfigError(f"--processes {processes} must be >= 1")
    if devices < processes or devices % processes:
        raise ConfigError(f"--devices {devices} is not a multiple of --processes {processes}: "
                          "every process gets the same number of fake CPU devices; set "
                          f"--devices to a multiple of {processes}")
    port = free_port()
    env = process_env(devices // processes)
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for rank in range(processes):
        cmd = [sys.executable, "-m", "mnemax.launch.cli", "train", *train_args,
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
               "--process-id", str(rank), "--heartbeat-timeout", str(heartbeat_timeout_s)]
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        children.append(child)
        relay = threading.Thread(target=_relay, daemon=True,
                                 args=(child.stdout, "" if rank == 0 else f"[process {rank}] ",
                                       out))
        relay.start()
        relays.append(relay)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = _wait(children, heartbeat_timeout_s + grace_s, out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for relay in relays:
        relay.join(timeout=5)
    worst = max(exit_code(c) for c in codes)
    if worst:
        summary = ", ".join(f"process {rank}: {describe(c)}" for rank, c in enumerate(codes))
        out.write(f"launch local: the job failed ({summary})\n")
        out.flush()
    return worst


def _wait(children: list[subprocess.Popen], deadline_s: float, out: IO[str]) -> list[int]:
    """Waits for every child; once one has failed, kills those still running `deadline_s`
    later (the runtime should have stopped them by then: something hangs)."""
    failed_at = None
    while any(child.poll() is None for child in children):
        for rank, child in enumerate(children):
            code = child.poll()
            if code not in (None, 0) and failed_at is None:
                failed_at = time.monotonic()
                out.write(f"launch local: process {rank} ended ({describe(code)}); the others "
                          "stop when the distributed runtime notices\n")
                out.flush()
        if failed_at is not None and time.monotonic() - failed_at > deadline_s:
            for rank, child in enumerate(children):
                if child.poll() is None:
                    out.write(f"launch local: process {rank} still runs {deadline_s:.0f} s "
                              "after a failure: killing it\n")
                    child.kill()
        time.sleep(0.1)
    return [child.returncode for child in children]
