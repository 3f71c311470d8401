"""The training loop: data -> jitted step -> metrics, eval, checkpoints, resume, signals."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from etils import epath
from rich.console import Console

from mnemax.errors import CheckpointError, ConfigError, MnemaxError
from mnemax.trainer.checkpoint import (
    Checkpointer,
    DamagedCheckpointError,
    abstract_with_shardings,
    is_url,
)
from mnemax.trainer.compile_cache import enable_compile_cache
from mnemax.trainer.console import LOG_FILE, LoggedConsole, make_console
from mnemax.trainer.data import eval_batches, open_dataset, train_iterator
from mnemax.trainer.events import EventLog
from mnemax.trainer.hardware import peak_flops_per_device, peak_memory_bytes
from mnemax.trainer.metrics import MetricsWriter, format_train_line
from mnemax.trainer.multiprocess import all_processes, barrier, compile_then_align
from mnemax.trainer.preemption import StopAgreement
from mnemax.trainer.profiling import StepProfiler
from mnemax.trainer.recipe import Recipe, recipe_to_dict
from mnemax.trainer.setup import TrainProgram, build_program


@dataclass
class TrainResult:
    """How a call to `train` ended."""

    final_step: int
    status: str  # completed | interrupted | halted_nonfinite | nothing_to_do
    last_checkpoint: int | None


def check_vocab(recipe: Recipe) -> None:
    """The model must have an output class for every token id the data can contain."""
    vocab = open_dataset(recipe.data, "train").vocab_size
    if recipe.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={recipe.model.vocab_size} is smaller than the data's vocabulary "
            f"of {vocab} tokens ({recipe.data.source}); set model.vocab_size>={vocab}"
        )


@functools.cache
def _target_byte_counter(mesh: jax.sharding.Mesh):
    """`(table [vocab], rows [batch, seq_len + 1]) -> bytes the rows' targets spell`, jitted
    once per mesh (not once per evaluation); the rows are global and the sum is replicated, so
    every process gets it."""
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(lambda table, rows: jax.numpy.sum(jax.numpy.take(table, rows[:, 1:])),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate_params(program: TrainProgram, state: Any, batches: list[np.ndarray],
                    byte_lengths: np.ndarray | None = None) -> dict:
    """Mean validation cross entropy and perplexity of `state`'s model over `batches`, and
    bits per byte (`eval_bpb`) given each token id's UTF-8 bytes `byte_lengths` `[vocab]`
    (`mnemax.trainer.bits_per_byte`): the nats of all targets over the bytes they spell."""
    from mnemax.trainer.bits_per_byte import bits_per_byte

    losses, byte_counts, targets = [], [], 0
    if byte_lengths is not None:
        table = jax.numpy.asarray(byte_lengths)
        count = _target_byte_counter(program.mesh)
    for b in batches:
        rows = program.global_batch(b)
        losses.append(program.eval_step(state.params, rows, state.model_state))
        targets += rows.shape[0] * (rows.shape[1] - 1)
        if byte_lengths is not None:
            with jax.set_mesh(program.mesh):
                byte_counts.append(count(table, rows))
    loss = float(np.mean([float(x) for x in losses]))
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if byte_lengths is not None and batches:
        # Every batch has the same number of targets: the mean loss times their count is the
        # total nats.
        result["eval_bpb"] = bits_per_byte(loss, targets, sum(int(c) for c in byte_counts))
    return result


def _json(value: Any) -> Any:
    """A value as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def _state_shape_fields(recipe_dict: dict) -> dict[str, Any]:
    """The recipe fields that decide the train state's tree (which arrays, of which shapes):
    every model field, and the optimizer fields that add or remove optimizer state (clipping
    on or off, the optimizer, the moments' storage)."""
    fields = {f"model.{k}": v for k, v in _json(recipe_dict.get("model", {})).items()}
    opt = recipe_dict.get("optimizer", {})
    fields["optimizer.name"] = opt.get("name", "adamw")
    fields["optimizer.clip_norm > 0"] = bool(opt.get("clip_norm", 1.0) > 0)
    fields["optimizer.moments_dtype"] = opt.get("moments_dtype", "float32")
    if fields["optimizer.moments_dtype"].startswith("float8"):
        fields["optimizer.moments_group_size"] = opt.get("moments_group_size", 128)
    return fields


def _differs(saved: Any, now: Any) -> bool:
    """Whether a recipe value differs from the checkpoint's. In a nested config (a dict) only
    the keys the checkpoint has count: one it lacks is a field added by a later mnemax (else no
    checkpoint of that config written before it could resume); whether the new field changes
    the state's tree, the restore's array check (`Checkpointer.restore`) decides."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return any(_differs(value, now.get(key)) for key, value in saved.items())
    return saved != now


def check_same_state(saved: dict, recipe: Recipe, step: int, directory: epath.Path) -> None:
    """Raises CheckpointError naming each recipe field whose change gives the train state
    another tree than the one checkpoint `step` holds (a changed model or optimizer state)."""
    before, now = _state_shape_fields(saved), _state_shape_fields(recipe_to_dict(recipe))
    changed = [f"{k}: checkpoint {before.get(k)!r} vs recipe {v!r}" for k, v in now.items()
               if _differs(before.get(k), v)]
    if changed:
        raise CheckpointError(
            f"the checkpoint at step {step} in {directory} was written with a different model "
            f"or optimizer state ({', '.join(changed)}). Use a new --run-dir for the new "
            "configuration, or set the recipe back"
        )


def _restore(program: TrainProgram, ckpt: Checkpointer, step: int, recipe: Recipe):
    saved = ckpt.saved_recipe(step)
    if saved is not None:
        check_same_state(saved, recipe, step, ckpt.directory)
    target = abstract_with_shardings(program.abstract_state, program.state_shardings)
    state, data, saved_recipe = ckpt.restore(step, target)
    if state.model_state is None:  # a checkpoint from before the train state had one
        fresh = {}
        if jax.tree.leaves(program.abstract_state.model_state):
            fresh = program.init(jax.random.key(recipe.run.seed)).model_state
            console = Console(highlight=False)
            console.print(f"checkpoint {ckpt.directory / str(step)} has no model state (it was "
                          "written before mnemax kept one): starting it from its initial value")
        state = state.replace(model_state=fresh)
    return state, data, saved_recipe


def resume_schedule(recipe: Recipe, saved: dict | None, console: Console) -> Recipe:
    """The recipe with its learning-rate schedule fixed to the one the run started with.

    `schedule.decay_steps=None` means "decay over run.steps"; a resume with a larger
    `run.steps` must not stretch the decay of a run already under way (the lr would jump back
    up). So the schedule's end is recorded in every checkpoint (the saved recipe's
    `schedule.decay_steps`, resolved) and a resume keeps it, staying at the final lr after it,
    unless the recipe gives `schedule.decay_steps` itself.
    """
    if recipe.schedule.decay_steps is not None:
        return recipe
    end = None
    if saved is not None:
        schedule = saved.get("schedule", {})
        end = schedule.get("decay_steps") or saved.get("run", {}).get("steps")
    if end is None:
        end = recipe.run.steps
    elif end != recipe.run.steps:
        console.print(
            f"keeping the checkpoint's learning-rate schedule: decay ends at step {end} "
            f"(run.steps={recipe.run.steps}; after step {end} the lr stays at its final "
            "value); set schedule.decay_steps to change it")
    return dataclasses.replace(recipe, schedule=dataclasses.replace(recipe.schedule,
                                                                    decay_steps=end))


def restore_newest_readable(program: TrainProgram, ckpt: Checkpointer, recipe: Recipe,
                            console: Console, events: EventLog):
    """`(state, data_state, step)` of the newest checkpoint every process can read, or None
    when there is no checkpoint.

    A checkpoint whose files are damaged (a truncated copy, a save cut short on a filesystem
    without atomic renames) is skipped with one line naming its step; once an older one has
    restored, the damaged ones are renamed `damaged-<step>` (nothing is deleted) so the resumed
    run can save those steps again. When none can be read, the newest one's error is raised
    and nothing is renamed. Every process takes the same decision (a restore that fails on one
    host fails everywhere).
    """
    steps = sorted(ckpt.all_steps(), reverse=True)
    damaged: list[tuple[int, DamagedCheckpointError]] = []
    for step in steps:
        error = None
        try:
            state, data_state, _ = _restore(program, ckpt, step, recipe)
        except DamagedCheckpointError as err:
            error = err
        if all_processes(error is None, "restored"):
            break
        damaged.append((step, error or DamagedCheckpointError(
            f"checkpoint {ckpt.directory / str(step)} could not be read on another process",
            step, "unreadable on another process")))
    else:
        if damaged:
            raise damaged[0][1]
        return None
    for bad, err in damaged:
        aside = ckpt.set_aside(bad) if jax.process_index() == 0 else None
        console.print(f"skipping checkpoint step {bad}: its files are damaged ({err.reason}); "
                      f"kept as {aside}; resuming from step {step}", soft_wrap=True,
                      markup=False)
        events.record("fallback", step, skipped_step=bad, reason=err.reason)
    if damaged:
        barrier("damaged_checkpoints_set_aside")
        ckpt.reload()
    return state, data_state, step


def _make_run_dir(run_dir: epath.PathLike) -> epath.Path:
    """`run_dir` as an epath (local paths made absolute, URLs kept), created by process 0."""
    path = epath.Path(run_dir)
    if not is_url(path):
        path = epath.Path(path.expanduser().absolute())
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
    return path


def train(recipe: Recipe, run_dir: epath.PathLike, *, console: Console | None = None,
          devices: list[jax.Device] | None = None) -> TrainResult:
    """Runs `recipe` until `recipe.run.steps`, resuming from the newest readable checkpoint in
    `run_dir` (a local path or a URL such as gs://bucket/run).

    With several processes (`jax.distributed`), every process calls this; process 0 alone
    prints, writes `metrics.jsonl`, `train.log` (what it prints, timestamped), the trackers
    (TensorBoard, wandb), `events.jsonl`, `recipe.json` and the profile; all of them write
    their shards of each checkpoint.
    """
    primary = jax.process_index() == 0
    enable_compile_cache(recipe.run)
    run_dir = _make_run_dir(run_dir)
    console = (LoggedConsole(console or make_console(), run_dir / LOG_FILE) if primary
               else Console(quiet=True))
    events = EventLog(run_dir, primary=primary)
    try:
        return _train(recipe, run_dir, console, devices, events)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt | SystemExit):
            events.record("fault", None, reason=f"{type(err).__name__}: "
                                                f"{' '.join(str(err).split())[:300]}")
        raise


def _train(recipe: Recipe, run_dir: epath.Path, console: Console,
           devices: list[jax.Device] | None, events: EventLog) -> TrainResult:
    began = time.perf_counter()
    primary = jax.process_index() == 0
    ckpt = Checkpointer(run_dir / "checkpoints", recipe.checkpoint)
    latest = ckpt.latest_step() if recipe.checkpoint.resume else None
    recipe = resume_schedule(recipe, ckpt.saved_recipe(latest) if latest is not None else None,
                             console)
    recipe_dict = recipe_to_dict(recipe)
    if primary:
        (run_dir / "recipe.json").write_text(json.dumps(recipe_dict, indent=2) + "\n")

    check_vocab(recipe)
    program = build_program(recipe, devices)
    run = recipe.run
    data = train_iterator(recipe.data, process_index=jax.process_index(),
                          process_count=jax.process_count())
    val_batches = (eval_batches(recipe.data, recipe.eval.batches,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
                   if recipe.eval.every > 0 and recipe.eval.batches > 0 else [])
    byte_lengths = _byte_lengths(recipe, console) if val_batches else None
    writer = MetricsWriter(run_dir, trackers=run.trackers, config=recipe_dict, enabled=primary)

    restored = (restore_newest_readable(program, ckpt, recipe, console, events)
                if recipe.checkpoint.resume else None)
    processes = jax.process_count()
    if restored is not None:
        state, data_state, latest = restored
        data.set_state(data_state)
        writer.truncate_after(latest)
        console.print(f"resumed from checkpoint {ckpt.directory / str(latest)} (step {latest})")
        events.record("resume", latest, processes=processes)
    else:
        latest = None
        state = program.init(jax.random.key(run.seed))
        events.record("start", 0, processes=processes)
    start = int(state.step)
    last_saved = latest

    tokens_per_step = recipe.data.global_batch * recipe.data.seq_len
    flops_per_step = recipe.model.flops_per_token(recipe.data.seq_len) * tokens_per_step
    peak = run.peak_flops_per_device or peak_flops_per_device()
    peak_total = peak * program.mesh.size
    console.print(
        f"[bold]{recipe.name}[/bold]: {program.param_count:,} params, "
        f"{recipe.model.flops_per_token(recipe.data.seq_len) / 1e6:.1f} MFLOPs/token, "
        f"mesh {dict(program.mesh.shape)}, ZeRO {recipe.strategy.zero_stage}, "
        f"steps {start}->{run.steps}, run dir {run_dir}"
    )
    if start >= run.steps:
        console.print(f"already at step {start} >= run.steps={run.steps}: nothing to do")
        ckpt.close()
        writer.close()
        return TrainResult(start, "nothing_to_do", last_saved)

    def save(step: int) -> None:
        nonlocal last_saved
        if last_saved == step:
            return
        ckpt.save(step, state, data.get_state(), recipe_dict)
        last_saved = step

    pending: list[tuple[int, dict]] = []  # steps dispatched but not yet read back
    status = "completed"
    step = start
    interval_start, interval_steps = None, 0
    # Seconds since the last written record spent waiting for batches and saving checkpoints,
    # and the compile time, written once (in this process's first record).
    waited = saving = 0.0
    compile_s: float | None = None
    first_done: tuple[int, float] | None = None  # (step, time) once the first step finished
    train_step = program.train_step
    with (StopAgreement() as stop,
          StepProfiler(run.profile_steps, run_dir, enabled=primary) as profiler):
        while step < run.steps:
            t0 = time.perf_counter()
            batch = program.global_batch(next(data))
            waited += time.perf_counter() - t0
            if step == start:
                train_step, compile_s = _compile_ahead(program, state, batch)
                console.print(f"compiled the train step in {compile_s:.2f} s")
            profiler.before_step(step + 1)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            if profiler.after_step(step, metrics):
                console.print(f"profile of steps {profiler.traced[0]}-{step} written to "
                              f"{profiler.directory}")
            stopping = stop.should_stop(step)  # every step, on every process
            if interval_start is None:  # the first step runs warm-up work: time from after it
                jax.block_until_ready(metrics)
                interval_start, interval_steps = time.perf_counter(), 0
                first_done = (step, interval_start)
            else:
                interval_steps += 1

            boundary = (step % run.log_every == 0 or step == run.steps
                        or (recipe.checkpoint.every and step % recipe.checkpoint.every == 0)
                        or (recipe.eval.every and step % recipe.eval.every == 0)
                        or stopping)
            if not boundary:
                continue
            host = [(s, jax.device_get(m)) for s, m in pending]
            pending.clear()
            # The metrics are replicated outputs of the step: every process reads the same
            # values and takes the same decision.
            bad = [s for s, m in host if not math.isfinite(float(m["loss"]))
                   or not math.isfinite(float(m["grad_norm"]))]
            if bad and run.nan_policy == "halt":
                console.print(
                    f"[red]non-finite loss or gradient at step {bad[0]}: halting.[/red] Last good "
                    f"checkpoint: {last_saved if last_saved is not None else 'none'} in "
                    f"{ckpt.directory}. Lower optimizer.learning_rate or set run.nan_policy=skip."
                )
                status = "halted_nonfinite"
                events.record("fault", bad[0], reason="non-finite loss or gradient",
                              policy="halt", last_checkpoint=last_saved)
                break
            elapsed = time.perf_counter() - interval_start
            # The state is at `step` now: evaluate it at every multiple of eval.every and at the
            # end, whether or not the step is also a logging step.
            eval_due = bool(val_batches) and (step % recipe.eval.every == 0
                                              or step == run.steps)
            evaluation = (evaluate_params(program, state, val_batches, byte_lengths)
                          if eval_due else {})
            logged = False
            for s, m in host:
                if s % run.log_every and s != run.steps:
                    continue
                logged = logged or s == step
                record = {"step": s, **{k: float(v) for k, v in m.items()}}
                if interval_steps > 0 and s == host[-1][0]:
                    step_time = elapsed / interval_steps
                    record["step_time_s"] = step_time
                    record["tokens_per_sec"] = tokens_per_step / step_time
                    record["mfu"] = flops_per_step / step_time / peak_total
                    peak_mem = peak_memory_bytes()
                    if peak_mem is not None:
                        record["peak_memory_gb"] = peak_mem / 1e9
                if s == step:
                    record.update(evaluation)
                record.update(data_wait_s=waited, checkpoint_s=saving)
                waited = saving = 0.0
                if compile_s is not None:
                    record["compile_s"], compile_s = compile_s, None
                writer.write(record)
                now = time.perf_counter()
                console.print(format_train_line(
                    record, run.steps, elapsed_s=now - began,
                    eta_s=_eta(first_done, s, now, run.steps)) + (
                    f" | eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
            if evaluation and not logged:
                writer.write({"step": step, **evaluation})
                console.print(f"step {step}/{run.steps} | eval {evaluation['eval_loss']:.4f}")
            interval_start, interval_steps = time.perf_counter(), 0

            if stopping:
                save(step)
                ckpt.wait()
                console.print(f"{stop.describe()}: saved checkpoint at step {step} in "
                              f"{ckpt.directory}; exiting")
                events.record("preemption", step, reason=stop.describe())
                status = "interrupted"
                break
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0:
                t0 = time.perf_counter()
                save(step)
                saving += time.perf_counter() - t0

    if status == "completed":
        save(step)
    ckpt.close()
    writer.close()
    if status == "completed":
        console.print(f"done: step {step}, checkpoint {last_saved} in {ckpt.directory}")
        events.record("end", step, last_checkpoint=last_saved)
    return TrainResult(step, status, last_saved)


def _compile_ahead(program: TrainProgram, state: Any, batch: jax.Array) -> tuple[Any, float]:
    """The train step compiled ahead of time for `state` and `batch`, and the seconds its
    `lower().compile()` took (the load time when the persistent compilation cache has it),
    returned once every process has compiled it: the processes start the first step together
    (`mnemax.trainer.multiprocess`)."""
    t0 = time.perf_counter()
    compiled = program.train_step.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    barrier("first_step_compiled")
    return compiled, seconds


def _eta(first_done: tuple[int, float] | None, step: int, now: float, total: int) -> float | None:
    """Seconds to step `total` at the pace since the first step finished (compile and warm-up
    excluded; checkpoints and evaluations included), or None before there is a pace."""
    if first_done is None or step <= first_done[0]:
        return None
    return (total - step) * (now - first_done[1]) / (step - first_done[0])


def evaluate(recipe: Recipe, run_dir: epath.PathLike, *, batches: int | None = None) -> dict:
    """Validation loss, perplexity and bits per byte of the newest checkpoint in `run_dir`
    (every process calls it)."""
    enable_compile_cache(recipe.run)
    run_dir = epath.Path(run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", recipe.checkpoint)
    step = ckpt.latest_step()
    if step is None:
        raise MnemaxError(f"no checkpoint in {run_dir / 'checkpoints'}: train first with "
                          f"`mnemax train {recipe.name} --run-dir {run_dir}`")
    program = build_program(recipe)
    state, _, _ = _restore(program, ckpt, step, recipe)
    ckpt.close()
    val = eval_batches(recipe.data, batches or recipe.eval.batches,
                       process_index=jax.process_index(), process_count=jax.process_count())
    if val:
        program = dataclasses.replace(program, eval_step=compile_then_align(
            program.eval_step, state.params, program.global_batch(val[0]), state.model_state))
    byte_lengths = _byte_lengths(recipe, Console(stderr=True, highlight=False))
    return {"step": step, **evaluate_params(program, state, val, byte_lengths)}


def _byte_lengths(recipe: Recipe, console: Console) -> np.ndarray | None:
    """UTF-8 bytes of each token id of the recipe's tokenizer (for bits per byte), or None,
    said on `console`, when that tokenizer cannot be loaded (moved since `data prepare`): the
    loss still counts."""
    from mnemax.trainer.bits_per_byte import token_byte_lengths
    from mnemax.trainer.data import load_tokenizer
    from mnemax.trainer.run_tokenizer import tokenizer_spec

    spec = tokenizer_spec(recipe.data)
    try:
        return token_byte_lengths(load_tokenizer(spec), spec)
    except MnemaxError as err:
        console.print(f"bits per byte left out: {err}", markup=False, soft_wrap=True)
        return None
