"""Multi-process start-up with JAX's own distributed runtime (one process per host or per GPU).

A job is multi-process when the command line says so (`--coordinator host:port --num-processes N
--process-id i`) or when JAX's cluster detection recognises the environment: SLURM (`srun`
sets `SLURM_NTASKS`, ...), Cloud TPU pods (metadata server), Kubernetes JobSet / any launcher
that sets `JAX_COORDINATOR_ADDRESS`, Open MPI; `MNEMAX_DISTRIBUTED=1` asks for detection where
no variable gives it away (a TPU pod's workers, found through the metadata server).
`jax.distributed.initialize` then connects the processes to one coordination service (process
0 hosts it), after which `jax.devices()` lists every process's devices and jitted steps run one
SPMD program over all of them.

Failure detection: each process sends heartbeats to the coordinator; a process that misses them
for `heartbeat_timeout_s` is declared dead and the runtime stops every other process (abort with
"Terminating process because the JAX distributed service detected fatal errors"), so a killed
host turns into a failed job within about that time instead of a hang in the next collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from mnemax.errors import ConfigError

# JAX's default is 100 s; the job must fail within a minute of losing a host, and a healthy
# process sends a heartbeat every few seconds whatever it computes (a background thread).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INIT_TIMEOUT_S = 300  # all processes must connect within this (slow schedulers)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Where this process sits in a multi-process job; None fields are left to JAX's detection."""

    coordinator: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of `mnemax train` and `mnemax eval`."""
    group = parser.add_argument_group(
        "multi-process", "explicit cluster layout (SLURM, TPU pods and JAX_COORDINATOR_ADDRESS "
                         "are detected without these)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0, where the coordination service runs")
    group.add_argument("--num-processes", type=int, default=None, metavar="N")
    group.add_argument("--process-id", type=int, default=None, metavar="I")
    group.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                       metavar="S", help="seconds without a heartbeat after which a process is "
                                         "declared dead and the job stops (default %(default)s)")


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The `ClusterSpec` the flags of `add_cluster_args` describe (ConfigError when partial)."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    present = [flag for flag, value in given.items() if value is not None]
    if present and len(present) < 3:
        missing = [flag for flag in given if flag not in present]
        raise ConfigError(f"{', '.join(present)} given without {', '.join(missing)}: an explicit "
                          "cluster needs all three (or none, to let JAX detect SLURM / TPU pods)")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        last = args.num_processes - 1
        raise ConfigError(f"--process-id {args.process_id} is not in [0, --num-processes "
                          f"{args.num_processes}); number the processes 0..{last}")
    if args.heartbeat_timeout < 1:
        raise ConfigError(f"--heartbeat-timeout {args.heartbeat_timeout} must be >= 1 second")
    return ClusterSpec(args.coordinator, args.num_processes, args.process_id,
                       heartbeat_timeout_s=args.heartbeat_timeout)


def _legacy_env_spec(spec: ClusterSpec) -> ClusterSpec:
    """`MNEMAX_COORDINATOR` / `MNEMAX_NUM_PROCESSES` / `MNEMAX_PROCESS_ID` (the environment
    interface before the flags existed) fill a spec the flags left empty."""
    if spec.coordinator is None and os.environ.get("MNEMAX_COORDINATOR"):
        return dataclasses.replace(spec, coordinator=os.environ["MNEMAX_COORDINATOR"],
                                   num_processes=int(os.environ["MNEMAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["MNEMAX_PROCESS_ID"]))
    return spec


def cluster_detected() -> bool:
    """Whether the environment describes a multi-process job JAX can configure by itself."""
    env = os.environ
    return bool(env.get("MNEMAX_DISTRIBUTED") == "1"  # asked for: let JAX detect the rest
                or env.get("JAX_COORDINATOR_ADDRESS")
                or env.get("SLURM_NTASKS", "1") != "1"  # srun with several tasks
                or env.get("OMPI_COMM_WORLD_SIZE", "1") != "1"  # mpirun
                or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)  # multi-host TPU slice


def use_cpu_collectives() -> None:
    """CPU devices of different processes exchange data through gloo (TCP); without it XLA:CPU
    has no cross-process collectives and the first sharded step fails. Same flag in jax 0.10
    and 0.12; harmless for GPU and TPU processes (it only configures the CPU client)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize(spec: ClusterSpec | None = None) -> bool:
    """Calls `jax.distributed.initialize` when `spec` (or the environment) describes a
    multi-process job; returns whether it did. Call before anything asks JAX for devices."""
    spec = _legacy_env_spec(spec or ClusterSpec())
    explicit = spec.coordinator is not None
    if not explicit and not cluster_detected():
        return False
    if explicit and spec.num_processes == 1:
        return False
    use_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        initialization_timeout=spec.init_timeout_s,
        heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
    )
    return True


def is_primary() -> bool:
    """Whether this process writes the run's shared files (console, metrics, events, recipe)."""
    return jax.process_index() == 0
