"""`python -m realsyn_pl <command> --config FILE [--config FILE2] [key=value ...] [--print-config]`.

One config path for every command: YAML preset(s) -> dotlist overrides -> dataclass validation -> the command's
typed function. Errors in the config or the input are one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from omegaconf import OmegaConf

from realsyn_pl import config as C


@dataclass
class Command:
    help: str
    # "module:Class": imported only for the command that runs (the demo's and build's schemas pull in heavy modules)
    schema_path: str
    run: Callable[[Any], Any]

    @property
    def schema(self) -> type:
        module, _, name = self.schema_path.partition(":")
        return getattr(importlib.import_module(module), name)


def _fit(cfg: C.FitConfig) -> None:
    from realsyn_pl.training.fit import run_fit

    run_fit(cfg)


def _eval(cfg: Any) -> int:
    from realsyn_pl.evaluation.run import exit_status, run_eval

    return exit_status(run_eval(cfg))


def _demo(cfg: Any) -> None:
    from realsyn_pl.demo.run import run_demo

    run_demo(cfg)


def _build(cfg: Any) -> None:
    from realsyn_pl.construct.engine.pipeline import run_build

    run_build(cfg)


def _predict(cfg: Any) -> None:
    from realsyn_pl.construct.engine.pipeline import run_predict

    run_predict(cfg)


def _fit_rewriter(cfg: Any) -> None:
    from realsyn_pl.training.rewriter_fit import run_fit_rewriter

    run_fit_rewriter(cfg)


def _make_instructions(cfg: Any) -> None:
    from realsyn_pl.construct.generate.instructions import run_make_instructions

    run_make_instructions(cfg)


def _shards(cfg: C.ShardsConfig) -> None:
    from realsyn_pl.data.own.run import run_shards

    run_shards(cfg)


# `build <stage>` / `predict <stage>`: a leading bare word is the stage name (same as stage=<name>).
STAGE_COMMANDS = ("build", "predict")


def _commands() -> dict[str, Command]:
    build = "realsyn_pl.construct.engine.config:BuildConfig"
    return {
        "fit": Command("pretrain CLIP on webdataset shards (paper recipe: configs/fit/)", "realsyn_pl.config:FitConfig",
                       _fit),
        "shards": Command("your own images + captions (a folder of a.jpg + a.txt, or a csv/tsv/parquet/jsonl table) "
                          "-> webdataset shards for fit", "realsyn_pl.config:ShardsConfig", _shards),
        "demo": Command("the built-in end-to-end run on a generated world (CPU, no downloads)",
                        "realsyn_pl.demo.run:DemoConfig", _demo),
        "build": Command("dataset construction: build <stage>|all (stages: data_build/README.md; presets: "
                         "configs/build/)", build, _build),
        "predict": Command("run a dataset-construction model stage: predict embed_images|embed_sentences|perplexity"
                           "|caption|tag|syn_text (alias rewrite)", build, _predict),
        "eval": Command("zero-shot, linear probe, retrieval and robustness evaluation (suites: eval/suites/)",
                        "realsyn_pl.evaluation.config:EvalConfig", _eval),
        "fit-rewriter": Command("fine-tune the stage-3 rewriter LLM on an instruction jsonl (LoRA by default)",
                                "realsyn_pl.construct.generate.config:RewriterFitConfig", _fit_rewriter),
        "make-instructions": Command("instruction jsonl for fit-rewriter from an OpenAI-compatible chat endpoint",
                                     "realsyn_pl.construct.generate.config:InstructionsConfig", _make_instructions),
    }


USAGE = "usage: python -m realsyn_pl <command> [--config FILE ...] [key=value ...] [--print-config] [--help]"


def _print_overview(commands: dict[str, Command]) -> None:
    print(USAGE)
    print("\ncommands:")
    for name, cmd in commands.items():
        print(f"  {name:<10} {cmd.help}")


def _print_command_help(name: str, cmd: Command) -> None:
    print(f"usage: python -m realsyn_pl {name} [--config FILE ...] [key=value ...] [--print-config]\n")
    print(cmd.help)
    if name == "build":
        import textwrap

        from realsyn_pl.construct.engine.order import STAGE_ORDER

        print("\nstages (build <stage> runs one; build all runs them in this order, until=<stage> stops after it):")
        print(textwrap.fill(", ".join(STAGE_ORDER), width=100, initial_indent="  ", subsequent_indent="  "))
        print("  release: the published RealSyn parquet files -> shards (not part of all)")
    print("\n--config FILE   YAML preset (repeatable; later files win): a path, or a shipped preset by name")
    from realsyn_pl.assets import preset_names

    folder = "build" if name == "predict" else name  # predict runs the build config's model stages
    shipped = [p for p in preset_names() if p.startswith(folder + "/")]
    if shipped:
        print(f"                ({', '.join(shipped)})")
    print("key=value       override any key below (dotted, e.g. data.batch_size=64)")
    print("--print-config  print the merged, validated config and exit\n")
    from realsyn_pl.config_help import describe

    print("config keys (key=default, then the comment beside it in the schema's source):")
    print(describe(cmd.schema))


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[str], bool, bool]:
    files, overrides, print_config, want_help = [], [], False, False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--print-config":
            print_config = True
        elif a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(args):
                    raise C.ConfigError("--config needs a file")
                i += 1
                files.append(args[i])
            else:
                files.append(a.split("=", 1)[1])
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise C.ConfigError(f"unexpected argument {a!r} (overrides are key=value)")
        i += 1
    return files, overrides, print_config, want_help


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        _print_overview(commands)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"error: unknown command {name!r}; commands: {', '.join(commands)}", file=sys.stderr)
        return 2
    cmd = commands[name]
    if name in STAGE_COMMANDS and rest and not rest[0].startswith("-") and "=" not in rest[0]:
        rest = rest[1:] + [f"stage={rest[0]}"]
    try:
        files, overrides, print_config, want_help = parse_args(rest)
        if want_help:
            _print_command_help(name, cmd)
            return 0
        cfg = C.load_config(cmd.schema, files, overrides)
        obj = C.to_object(cfg)  # the schema's own checks (enums, ranges) run here: --print-config shows valid configs only
        if print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        return cmd.run(obj) or 0  # a command may return its own exit code (eval: 1 when a run failed)
    except C.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        from realsyn_pl.training.environment import close_process_group

        close_process_group()
    return 0


def entry() -> None:
    """`python -m realsyn_pl` and the `realsyn_pl` console script."""
    try:
        sys.exit(main())
    except BrokenPipeError:
        # `realsyn_pl fit --help | head`: the reader left; exit quietly as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
