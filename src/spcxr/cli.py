"""The ``spcxr`` command: thin wrappers that parse flags, resolve a config and call the library.

Only subcommands that really work are registered.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spcxr import __version__
from spcxr.config import add_arguments, resolve, save_yaml
from spcxr.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    USAGE_ERRORS,
    RunFailed,
    RunStopped,
    error_line,
    is_usage_os_error,
)
from spcxr.train.signals import stop_exit_status

# ---------------------------------------------------------------------------------------------
# prepare


def _cmd_prepare(args: argparse.Namespace) -> int:
    from spcxr.data.prepare import PrepareConfig, prepare

    config = resolve(PrepareConfig, args)
    result = prepare(config)  # no SOURCE, a bad flag value: UsageError (exit status 2)
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
    if result.budget_stop:
        again = [a for a in args.argv if a != "--no-resume"]
        if "--resume" not in again:
            again.append("--resume")
        status = stop_exit_status(result.budget_stop)
        if status:
            why = f"stopped by {result.budget_stop}"
        else:  # the budget as the flag that set it
            why = "--" + result.budget_stop.replace("_", "-") + " spent"
        print(
            f"run {result.run_dir}: {why} at step {result.steps} of {result.total_steps}; "
            f"checkpoint saved. Continue with: spcxr {shlex.join(again)}"
        )
        return status
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        print(
            f"run {result.run_dir}: {result.steps} steps, masked L1 {first[1]:.4f} (step {first[0]}) "
            f"-> {last[1]:.4f} (step {last[0]}), {result.views_per_second:.0f} views/s; "
            f"encoder: {result.encoder_path}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# finetune, segment, evaluate


def _cmd_finetune(args: argparse.Namespace) -> int:
    from spcxr.tasks.classify import FinetuneConfig, finetune

    config = resolve(FinetuneConfig, args)
    for info in _draws(config, finetune):
        out = info["run_dir"]
        train = info["data"]["train"]
        print(
            f"run {out}: {info['steps']} steps in {info['seconds']:.0f} s on {train['images']} "
            f"images ({train['patients']} patients); best validation {info['select']} "
            f"{info['best_value']:.4f} at step {info['best_step']}; model: {out}/model"
            + (" (already finished)" if info.get("skipped") else "")
        )
    return 0


def _draws(config, train_fn) -> list[dict]:
    """One run, or one per label draw with ``--budget-seeds``."""
    from spcxr.tasks.loop import run_draws

    if config.budget_seeds:
        return run_draws(config, train_fn)
    return [{**train_fn(config), "run_dir": config.out}]


def _cmd_segment(args: argparse.Namespace) -> int:
    from spcxr.tasks.segment import SegmentConfig, segment

    config = resolve(SegmentConfig, args)
    for info in _draws(config, segment):
        out = info["run_dir"]
        train = info["data"]["train"]
        print(
            f"run {out}: {info['steps']} steps in {info['seconds']:.0f} s on {train['images']} "
            f"images ({train['patients']} patients); best validation Dice "
            f"{info['best_value']:.4f} at step {info['best_step']}; model: {out}/model"
            + (" (already finished)" if info.get("skipped") else "")
        )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from spcxr.tasks.sweep import SweepConfig, sweep

    result = sweep(resolve(SweepConfig, args))
    out = Path(result["sweep"]["out"])
    for name, setting in result["chosen"].items():
        print(f"{name}: chosen {setting} on validation; recipe: {out / f'best_{name}.yaml'}")
    print(f"table: {out / 'sweep.md'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from spcxr.tasks.evaluate import EvaluateConfig, evaluate
    from spcxr.tasks.report import ci_text

    config = resolve(EvaluateConfig, args)
    results = evaluate(config)
    for row in results["comparison"]:
        draws = f", {row['draws']} draws" if row.get("draws", 1) > 1 else ""
        print(
            f"{row['setting']}: {row['init']}, budget {row['budget']} ({row['train_images']} "
            f"images{draws}), tested on {row['tested_on']}"
            + (" (external)" if row.get("external") else "")
            + f": {row['metric']} {ci_text(row['value'])}"
        )
    for row in results.get("paired", []):
        d = row["difference"]
        kind = f"paired over {d['n']} draws" if d["paired"] else "unpaired"
        print(
            f"{row['comparison']}, budget {row['budget']}, tested on {row['tested_on']}: "
            f"{row['metric']} {ci_text(d)} ({kind})"
        )
    print(f"report: {Path(config.out) / 'report.md'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from spcxr.inference import PredictConfig, predict

    config = resolve(PredictConfig, args)
    frame = predict(config)
    errors = int((frame["status"] == "error").sum())
    print(f"{len(frame) - errors} images predicted, {errors} errors: {config.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from spcxr.export import ExportConfig, export

    out = export(resolve(ExportConfig, args))
    print(f"exported to {out} (model card: {out / 'MODEL_CARD.md'})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from spcxr.serve import ServeConfig, serve

    serve(resolve(ServeConfig, args))
    return 0


@dataclass
class StudyCommand:
    """Run a real-data study from a YAML file (configs/study_*.yaml): prepare, pretrain, tasks.

    Attributes:
        study: the study's YAML file.
        only: run only these tasks (names in the file).
        stop_after: stop after ``prepare``, ``pretrain`` or ``train`` (runs trained, not evaluated).
        device: override the file's device (``cpu``, ``cuda``).
        out: override the file's output folder.
        inits: override the file's initialisations (e.g. ``scratch`` alone needs no pretraining).
        finished_only: evaluate the runs that have finished and leave the others out (listed on
            the results page) instead of training them.
    """

    study: str = ""
    only: list[str] = field(default_factory=list)
    inits: list[str] = field(default_factory=list)
    finished_only: bool = False
    stop_after: str = ""
    device: str = ""
    out: str = ""


def _cmd_study(args: argparse.Namespace) -> int:
    from spcxr.study import load_study, run_study

    cmd = resolve(StudyCommand, args)
    overrides = {
        k: v
        for k, v in (
            ("only", cmd.only),
            ("stop_after", cmd.stop_after),
            ("device", cmd.device),
            ("out", cmd.out),
            ("inits", cmd.inits),
            ("finished_only", cmd.finished_only),
        )
        if v
    }
    summary = run_study(load_study(cmd.study, overrides))
    print(json.dumps(summary, indent=2, default=str))
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
        out: output folder of the demo (synthetic data, store, runs, report.md).
        data: run the same pipeline on this folder of real images instead (any layout that
            ``spcxr prepare`` reads); empty: the embedded synthetic set.
        n_patients: synthetic patients to generate.
        seed: random seed.
        steps: GMML pretraining steps.
        finetune_steps: fine-tuning steps per classifier.
        segment_steps: segmentation training steps.
        n_boot: bootstrap replicates of the confidence intervals.
        draws: label draws of the classifiers (GMML and scratch on the same draws; the report
            gives their paired difference with an interval).
    """

    out: str = "demo_out"
    data: str = ""
    n_patients: int = 120
    seed: int = 0
    steps: int = 120
    finetune_steps: int = 60
    segment_steps: int = 80
    n_boot: int = 500
    draws: int = 3


def _cmd_demo(args: argparse.Namespace) -> int:
    from spcxr.demo import run_demo

    cmd = resolve(DemoCommand, args)
    summary = run_demo(
        Path(cmd.out),
        n_patients=cmd.n_patients,
        seed=cmd.seed,
        steps=cmd.steps,
        data=cmd.data,
        finetune_steps=cmd.finetune_steps,
        segment_steps=cmd.segment_steps,
        n_boot=cmd.n_boot,
        draws=cmd.draws,
    )
    print(json.dumps(summary, indent=2))
    print(f"report: {summary['report']}")
    return 0


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: its settings class (``module:Class``, imported when the parser is built,
    since every setting is a flag) and the function that runs it."""

    name: str
    help: str
    settings: str
    run: Callable[[argparse.Namespace], int]
    positional: tuple[tuple[str, str], ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("prepare", "read raw datasets into a prepared store",
            "spcxr.data.prepare:PrepareConfig", _cmd_prepare, (("sources", "SOURCE"),)),
    Command("pretrain", "GMML self-supervised pretraining of a ViT",
            "spcxr.pretrain.engine:PretrainConfig", _cmd_pretrain),
    Command("finetune",
            "fine-tune a classifier (or linear-probe) from a GMML encoder or from scratch",
            "spcxr.tasks.classify:FinetuneConfig", _cmd_finetune),
    Command("segment", "train a lung segmenter on a pretrained (or random) ViT",
            "spcxr.tasks.segment:SegmentConfig", _cmd_segment),
    Command("sweep",
            "choose a fine-tuning or segmentation recipe on validation, per initialisation",
            "spcxr.tasks.sweep:SweepConfig", _cmd_sweep),
    Command("evaluate", "metrics with confidence intervals, drift tables, comparisons and plots",
            "spcxr.tasks.evaluate:EvaluateConfig", _cmd_evaluate, (("runs", "RUN"),)),
    Command("predict",
            "apply a trained run to image files: probabilities, lung masks, explanation maps (CSV)",
            "spcxr.inference:PredictConfig", _cmd_predict, (("inputs", "INPUT"),)),
    Command("export",
            "portable weights: safetensors, timm encoder, ONNX, preprocessing.json, model card",
            "spcxr.export:ExportConfig", _cmd_export),
    Command("serve",
            "a local web service and page for trained runs: POST /v1/predict, GET /v1/models, /",
            "spcxr.serve.app:ServeConfig", _cmd_serve),
    Command("study", "run a real-data study (prepare, pretrain, tasks, results page)",
            "spcxr.cli:StudyCommand", _cmd_study, (("study", "CONFIG"),)),
    Command("synth", "write the synthetic chest-radiograph set", "spcxr.cli:SynthCommand",
            _cmd_synth),
    Command("demo", "run spcxr end to end on the embedded synthetic set",
            "spcxr.cli:DemoCommand", _cmd_demo),
)  # fmt: skip


def _settings_class(spec: str) -> type:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spcxr",
        description="Self-supervised chest X-ray foundation models (GMML pretraining of ViTs).",
    )
    parser.add_argument("--version", action="version", version=f"spcxr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        cls = _settings_class(command.settings)
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=(cls.__doc__ or command.help).split("\n")[0],
        )
        add_arguments(p, cls, positional=dict(command.positional))
        p.set_defaults(func=command.run)
    return parser


# Commands whose runs continue only when asked to (others resume by themselves).
_RESUME_FLAG = {"pretrain": "--resume", "finetune": "--train-resume", "segment": "--train-resume"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a resume command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RunStopped as e:
        print(f"spcxr {args.command}: {e}", file=sys.stderr if e.exit_status else sys.stdout)
        return e.exit_status
    except KeyboardInterrupt:
        # A second Ctrl-C (the first one checkpoints and stops cleanly) or one outside a
        # training loop: the last checkpoint stays.
        flag = _RESUME_FLAG.get(args.command)
        again = (
            f"the same command with {flag}"
            if flag and flag not in args.argv
            else "the same command"
        )
        print(f"spcxr {args.command}: interrupted (run {again} to resume)", file=sys.stderr)
        return 130
    except USAGE_ERRORS as e:
        print(f"spcxr {args.command}: error: {error_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as e:
        print(f"spcxr {args.command}: failed: {error_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if is_usage_os_error(e):  # a read-only file system: choose another output folder
            print(f"spcxr {args.command}: error: {error_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        # A full disk or an I/O fault mid-run: the atomic writes leave nothing torn, and the
        # same command resumes once the cause is fixed.
        print(f"spcxr {args.command}: failed: {error_line(e)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
