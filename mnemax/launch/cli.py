"""The `mnemax` command line: train, eval, generate, export, show, compile, plan, launch, data.

This is a public interface that scripts depend on; change it only compatibly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mnemax.errors import MnemaxError
from mnemax.launch.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S, add_cluster_args


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="built-in recipe name (see `mnemax recipes`), a .py file, "
                                       "or a run's resolved recipe.json (runs/NAME/recipe.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set model.num_layers=4 "
                             "--set strategy.mesh=data:2,fsdp:4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnemax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (resumes from the run dir's newest "
                                         "checkpoint)")
    _add_recipe_args(train)
    train.add_argument("--run-dir", default=None,
                       help="where metrics, checkpoints and the resolved recipe go "
                            "(default: runs/RECIPE); a path or a URL such as gs://bucket/run")
    add_cluster_args(train)

    evaluate = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a "
                                            "run's newest checkpoint")
    _add_recipe_args(evaluate)
    evaluate.add_argument("--run-dir", required=True)
    evaluate.add_argument("--batches", type=int, default=None,
                          help="validation batches (default: the recipe's eval.batches)")
    add_cluster_args(evaluate)

    generate = sub.add_parser("generate", help="sample a continuation of a prompt from a run's "
                                               "newest checkpoint")
    _add_recipe_args(generate)
    generate.add_argument("--run-dir", required=True)
    generate.add_argument("--prompt", required=True, help="text the continuation follows")
    generate.add_argument("--max-tokens", type=int, default=128,
                          help="tokens to generate (default 128; fewer when eos comes first)")
    generate.add_argument("--temperature", type=float, default=1.0,
                          help="softmax temperature of the sampling (default 1.0)")
    generate.add_argument("--top-k", type=int, default=None,
                          help="sample among the K most likely tokens (default: all)")
    generate.add_argument("--greedy", action="store_true",
                          help="take the most likely token every step (deterministic)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    export = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face "
                                           "LlamaForCausalLM (dense Llama-style recipes)")
    _add_recipe_args(export)
    export.add_argument("--run-dir", required=True)
    export.add_argument("--hf", required=True, metavar="OUT",
                        help="output directory: model.safetensors, config.json, tokenizer files")

    launch = sub.add_parser("launch", help="start a multi-process job")
    launch_sub = launch.add_subparsers(dest="launch_command", required=True)
    local = launch_sub.add_parser(
        "local", help="train with N CPU processes on this machine (JAX's distributed runtime, "
                      "gloo collectives, fake devices): multi-host behaviour without a cluster")
    _add_recipe_args(local)
    local.add_argument("--processes", type=int, required=True, metavar="N")
    local.add_argument("--devices", type=int, default=8, metavar="TOTAL",
                       help="fake CPU devices in all, TOTAL / N per process (default 8)")
    local.add_argument("--run-dir", default=None, help="as for `mnemax train`")
    local.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                       metavar="S", help="seconds before a silent process counts as dead")

    show = sub.add_parser("show", help="resolved recipe, parameter count, FLOPs/token, memory")
    _add_recipe_args(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("--compiled", action="store_true",
                      help="also compile the train step and report XLA's per-device memory")

    compiler = sub.add_parser(
        "compile", help="compile the recipe's init and train step for a TPU topology on any "
                        "machine (libtpu's compile-only topologies): memory per chip, fit, "
                        "FLOPs, the compiler's step estimate")
    _add_recipe_args(compiler)
    compiler.add_argument("--topology", required=True, metavar="NAME",
                          help="TPU slice, e.g. v5e:2x2, v5p:2x2x1, v5p:2x2x2, v6e:2x2")
    compiler.add_argument("--json", action="store_true", help="print one JSON object")

    planner = sub.add_parser(
        "plan", help="fastest ZeRO stage / remat / offload / grad_accum / mesh that fits a "
                     "memory budget (compiled on fake CPU devices)")
    _add_recipe_args(planner)
    planner.add_argument("--topology", default=None, metavar="NAME",
                         help="plan for a TPU slice (e.g. v5p:2x2x2) with the real TPU "
                              "compiler (libtpu compile-only); replaces the three flags below")
    planner.add_argument("--devices", type=int, default=None,
                         help="number of GPUs to plan for, e.g. 64")
    planner.add_argument("--memory-per-device", default=None, metavar="SIZE",
                         help="budget per device: 80GB (10^9 bytes), 80GiB or 80G (2^30 "
                              "bytes); default: the device kind's memory")
    planner.add_argument("--device-kind", default=None,
                         help="GPU for the FLOP/s and bandwidth figures: h100, h200, "
                              "a100, b200 (default h100)")
    planner.add_argument("--json", action="store_true", help="print one JSON object")
    planner.add_argument("--no-cache", action="store_true",
                         help="measure again instead of reading $MNEMAX_CACHE/plan")

    sub.add_parser("recipes", help="list the built-in recipes")

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser(
        "prepare", help="tokenize a corpus into token streams (seq_len is chosen at train time)")
    prepare.add_argument("--input", required=True,
                         help="path or glob: .txt (one document per file), .jsonl, .parquet, or "
                              "a datasets.save_to_disk directory, e.g. 'corpus/**/*.jsonl'")
    prepare.add_argument("--tokenizer", default="bytes",
                         help="bytes, or a path to tokenizer.json (bos/eos read from the "
                              "tokenizer_config.json beside it)")
    prepare.add_argument("--out", required=True,
                         help="output directory (must not exist or be empty)")
    prepare.add_argument("--val-percent", type=float, default=2.0,
                         help="percent of documents held out for validation (by text hash)")
    prepare.add_argument("--text-field", default="text",
                         help="field holding the text in .jsonl/.parquet/datasets (default text)")
    prepare.add_argument("--workers", type=int, default=1,
                         help="tokenizing processes (default 1)")
    prepare.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                         help="non-UTF-8 text: strict (an error) or replace (U+FFFD)")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from mnemax.launch.distributed import cluster_spec, maybe_initialize
    from mnemax.recipes.registry import load_recipe
    from mnemax.trainer.loop import train

    maybe_initialize(cluster_spec(args))
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", recipe.name)
    result = train(recipe, run_dir)
    return {"completed": 0, "nothing_to_do": 0, "interrupted": 0}.get(result.status, 1)


def _cmd_eval(args: argparse.Namespace) -> int:
    from mnemax.launch.distributed import cluster_spec, is_primary, maybe_initialize
    from mnemax.recipes.registry import load_recipe
    from mnemax.trainer.loop import evaluate

    maybe_initialize(cluster_spec(args))
    recipe = load_recipe(args.recipe, args.overrides)
    result = evaluate(recipe, args.run_dir, batches=args.batches)
    if is_primary():
        print(json.dumps(result))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from mnemax.launch.local import launch_local

    train_args = [args.recipe]
    if args.run_dir is not None:
        train_args += ["--run-dir", args.run_dir]
    for item in args.overrides:
        train_args += ["--set", item]
    return launch_local(args.processes, train_args, devices=args.devices,
                        heartbeat_timeout_s=args.heartbeat_timeout)


def _cmd_show(args: argparse.Namespace) -> int:
    from mnemax.recipes.registry import load_recipe
    from mnemax.recipes.summary import print_summary, summarize

    recipe = load_recipe(args.recipe, args.overrides)
    summary = summarize(recipe, compiled=args.compiled)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from mnemax.launch.compile import compile_recipe, print_report, require_fit

    report = compile_recipe(args.recipe, args.overrides, args.topology,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print_report(report)
    require_fit(report)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from mnemax.errors import ConfigError
    from mnemax.launch.plan import plan, require_fit
    from mnemax.launch.plan_cost import hardware, parse_memory
    from mnemax.launch.plan_report import print_plan

    gpu_flags = {"--devices": args.devices, "--memory-per-device": args.memory_per_device,
                 "--device-kind": args.device_kind}
    if args.topology is not None:
        given = [flag for flag, value in gpu_flags.items() if value is not None]
        if given:
            raise ConfigError(f"--topology {args.topology} gives the chips, their number and "
                              f"their memory; drop {', '.join(given)}")
        from mnemax.launch.compile import tpu_hardware, tpu_topology_devices

        chips = tpu_topology_devices(args.topology)
        hw, devices = tpu_hardware(chips[0]), len(chips)
        budget = hw.memory_bytes
    else:
        if args.devices is None:
            raise ConfigError("mnemax plan needs --devices N (GPUs, with --memory-per-device "
                              "and --device-kind) or --topology NAME (a TPU slice)")
        hw, devices = hardware(args.device_kind or "h100"), args.devices
        budget = (parse_memory(args.memory_per_device) if args.memory_per_device is not None
                  else hw.memory_bytes)
    result = plan(args.recipe, args.overrides, devices=devices, budget=budget, hw=hw,
                  cache=not args.no_cache, topology=args.topology,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print_plan(result, args.recipe)
    require_fit(result)
    return 0


def _cmd_recipes(_args: argparse.Namespace) -> int:
    from mnemax.recipes.registry import builtin_names

    print("\n".join(builtin_names()))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from mnemax.trainer.data import prepare

    meta = prepare(args.input, args.tokenizer, args.out, val_percent=args.val_percent,
                   text_field=args.text_field, workers=args.workers,
                   encoding_errors=args.encoding_errors)
    for name, split in meta["splits"].items():
        print(f"{name}: {split['num_docs']} documents, {split['num_tokens']} tokens")
    print(f"wrote {args.out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from mnemax.launch.generate import Sampling, generate
    from mnemax.recipes.registry import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k, greedy=args.greedy, seed=args.seed)
    print(generate(recipe, args.run_dir, args.prompt, sampling))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mnemax.launch.export_hf import export_hf
    from mnemax.recipes.registry import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out = export_hf(recipe, args.run_dir, args.hf)
    print(f"wrote {out} (LlamaForCausalLM: model.safetensors, config.json, tokenizer files)")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "show": _cmd_show, "compile": _cmd_compile,
            "generate": _cmd_generate, "export": _cmd_export,
            "plan": _cmd_plan, "launch": _cmd_launch,
            "recipes": _cmd_recipes, "data": _cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mnemax.launch.platforms import skip_absent_tpu

    skip_absent_tpu()
    try:
        return COMMANDS[args.command](args)
    except MnemaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
