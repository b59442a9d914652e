"""The ``spcxr`` command: thin wrappers that parse flags, resolve a config and call the library.

Only subcommands that really work are registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spcxr import __version__
from spcxr.config import add_arguments, resolve, save_yaml

# ---------------------------------------------------------------------------------------------
# prepare


def _cmd_prepare(args: argparse.Namespace) -> int:
    from spcxr.data.prepare import PrepareConfig, prepare

    config = resolve(PrepareConfig, args)
    if not config.sources:
        raise SystemExit("spcxr prepare: name at least one SOURCE ([NAME=][TYPE:]PATH)")
    result = prepare(config)
    save_yaml(config, Path(config.out) / "prepare_config.yaml")
    _print_prepare(result)
    if config.strict and result.n_errors:
        print(
            f"--strict: {result.n_errors} inputs were skipped (see {result.store}/errors.csv)",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_prepare(result) -> None:
    r = result.report
    splits = ", ".join(f"{k} {v['images']}" for k, v in r["splits"].items())
    print(
        f"store {result.store}: {r['images']} images, {r['patients']} patients, "
        f"{r['with_mask']} masks | splits: {splits} | duplicate pairs: {r['duplicates']['pairs']} "
        f"| skipped: {result.n_errors} | {result.n_processed} images processed in "
        f"{result.seconds:.1f} s ({result.n_resumed_chunks} chunks resumed) | report: "
        f"{result.store}/report.md"
    )


# ---------------------------------------------------------------------------------------------
# pretrain


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from spcxr.pretrain.engine import PretrainConfig, pretrain

    config = resolve(PretrainConfig, args)
    result = pretrain(config)
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        print(
            f"run {result.run_dir}: {result.steps} steps, masked L1 {first[1]:.4f} (step {first[0]}) "
            f"-> {last[1]:.4f} (step {last[0]}), {result.views_per_second:.0f} views/s; "
            f"encoder: {result.encoder_path}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# synth


@dataclass
class SynthCommand:
    """Write the embedded synthetic chest-radiograph set (PNG + masks + manifest.csv).

    Attributes:
        out: output folder.
        n_patients: number of synthetic patients.
        size: image side in pixels.
        seed: random seed (the same seed writes byte-identical files).
    """

    out: str = "synthetic"
    n_patients: int = 120
    size: int = 256
    seed: int = 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset

    cmd = resolve(SynthCommand, args)
    manifest = write_synthetic_dataset(
        cmd.out,
        SyntheticConfig(n_patients=cmd.n_patients, size=cmd.size, seed=cmd.seed),
        progress=True,
    )
    print(f"synthetic set written: {manifest}")
    return 0


# ---------------------------------------------------------------------------------------------
# demo


@dataclass
class DemoCommand:
    """Run spcxr end to end on the embedded synthetic set, on the CPU in minutes.

    Attributes:
        out: output folder of the demo (synthetic data, store, runs).
        n_patients: synthetic patients to generate.
        seed: random seed.
        steps: GMML pretraining steps.
    """

    out: str = "demo_out"
    n_patients: int = 120
    seed: int = 0
    steps: int = 150


def _cmd_demo(args: argparse.Namespace) -> int:
    from spcxr.demo import run_demo

    cmd = resolve(DemoCommand, args)
    summary = run_demo(Path(cmd.out), n_patients=cmd.n_patients, seed=cmd.seed, steps=cmd.steps)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------


COMMANDS: dict[str, tuple[str, type | None, Callable[[argparse.Namespace], int], dict]] = {}


def _register(name: str, help_text: str, config_cls: type, fn, positional: dict | None = None):
    COMMANDS[name] = (help_text, config_cls, fn, positional or {})


def build_parser() -> argparse.ArgumentParser:
    from spcxr.data.prepare import PrepareConfig

    _register(
        "prepare",
        "read raw datasets into a prepared store",
        PrepareConfig,
        _cmd_prepare,
        {"sources": "SOURCE"},
    )
    from spcxr.pretrain.engine import PretrainConfig

    _register(
        "pretrain", "GMML self-supervised pretraining of a ViT", PretrainConfig, _cmd_pretrain
    )
    _register("synth", "write the synthetic chest-radiograph set", SynthCommand, _cmd_synth)
    _register("demo", "run spcxr end to end on the embedded synthetic set", DemoCommand, _cmd_demo)

    parser = argparse.ArgumentParser(
        prog="spcxr",
        description="Self-supervised chest X-ray foundation models (GMML pretraining of ViTs).",
    )
    parser.add_argument("--version", action="version", version=f"spcxr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, cls, fn, positional) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=(cls.__doc__ or help_text).split("\n")[0]
        )
        add_arguments(p, cls, positional=positional)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"spcxr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
