"""The ``needle-steering`` command line.

Each subcommand imports the layers it needs only when it runs, so ``--help`` starts fast. Errors
raised on purpose (:class:`~needle_steering.errors.NeedleSteeringError`) reach the user as one
line on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from needle_steering import __version__
from needle_steering.errors import NeedleSteeringError

EXIT_ERROR = 2
EXIT_THRESHOLD_FAILED = 1

Handler = Callable[[argparse.Namespace], int]


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --- info -----------------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    from needle_steering.perception.io import describe, read_volume

    volume = read_volume(args.image, series_uid=args.series_uid, allow_nonfinite=args.allow_nonfinite)
    info = describe(volume)
    if args.json:
        _print_json(info)
        return 0
    print(f"source       {info['source']}  ({info['format']})")
    print(f"size         {' x '.join(str(n) for n in info['size'])} voxels, {info['dtype']}")
    print(f"spacing      {' x '.join(f'{s:.4g}' for s in info['spacing'])} mm")
    print(f"origin       ({', '.join(f'{o:.2f}' for o in info['origin'])}) mm LPS")
    print(f"orientation  {info['orientation']}  direction {[round(d, 4) for d in info['direction']]}")
    print(f"intensity    {info['min']:.6g} .. {info['max']:.6g}")
    print(f"modality     {info['modality']}")
    return 0


# --- bench ----------------------------------------------------------------------------------------
def _cmd_bench(args: argparse.Namespace) -> int:
    from needle_steering.bench import registry, run_benchmarks

    only = [n for item in (args.only or []) for n in item.split(",") if n]
    if args.list:
        for name, bench in registry().items():
            print(f"{name:40s} {bench.unit:10s} {bench.target:16s} {bench.description}")
        return 0
    names = only or list(registry())
    results: dict[str, dict[str, float | str]] = {}
    for name in names:
        if not args.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        results.update(run_benchmarks([name]))
        if not args.json:
            bench = registry()[name]
            value = results[name]["value"]
            print(f"{name:40s} {value:>14.6g} {bench.unit:8s} target {bench.target or '-'}", flush=True)
    if args.json:
        _print_json(results)
    return 0


# --- phantom --------------------------------------------------------------------------------------
def _cmd_phantom(args: argparse.Namespace) -> int:
    from needle_steering.perception.labels import parse_level_range
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom, write_phantom

    config = PhantomConfig(
        seed=args.seed,
        levels=tuple(parse_level_range(args.levels)),
        modality=args.modality,
        spacing_mm=args.spacing,
        lesion=args.lesion,
        bone_quality=args.bone_quality,
    )
    start = time.perf_counter()
    phantom = generate_phantom(config)
    paths = write_phantom(phantom, args.out)
    seconds = time.perf_counter() - start
    summary = {
        "out": str(Path(args.out)),
        "files": {k: str(v) for k, v in paths.items()},
        "size": list(phantom.ct.shape),
        "spacing_mm": [float(s) for s in phantom.ct.spacing_mm],
        "levels": list(config.levels),
        "modality": config.modality,
        "seconds": round(seconds, 3),
    }
    if args.json:
        _print_json(summary)
    else:
        print(
            f"phantom seed {config.seed} ({config.modality}, {', '.join(config.levels)}) "
            f"{' x '.join(map(str, phantom.ct.shape))} voxels at {config.spacing_mm} mm in {seconds:.1f} s"
        )
        for name, path in paths.items():
            print(f"  {name:8s} {path}")
    return 0


# --- segment --------------------------------------------------------------------------------------
def _cmd_segment(args: argparse.Namespace) -> int:
    from needle_steering.perception.io import read_volume, write_volume
    from needle_steering.perception.segment import segment_volume

    volume = read_volume(args.image, series_uid=args.series_uid)
    result = segment_volume(volume, backend=args.backend, device=args.device, modality=args.modality)
    out = write_volume(result.labels, args.out)
    if args.json:
        _print_json({**result.summary(), "out": str(out)})
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{'level':6s} {'id':>4s} {'volume ml':>10s}")
    for name, entry in result.levels.items():
        print(f"{name:6s} {entry['id']:>4d} {entry['volume_ml']:>10.1f}")
    print(f"{result.backend} on {result.device} in {result.seconds:.1f} s, level confidence "
          f"{result.level_confidence:.2f} ({', '.join(result.anchors) or 'no anatomical anchor'}); wrote {out}")
    return 0


# --- train-seg ------------------------------------------------------------------------------------
def _cmd_train_seg(args: argparse.Namespace) -> int:
    # perception may not import sim: the command line joins the phantom generator to the trainer.
    from needle_steering.perception.training import phantom_sample_provider, train_segmentation
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    config = train_segmentation(
        args.out, seed=args.seed, epochs=args.epochs, samples=args.samples, threads=args.threads,
        progress=not args.no_progress, provider=phantom_sample_provider(generate_phantom, PhantomConfig),
        time_budget_s=args.time_budget * 60.0 if args.time_budget else None, log=print,
    )
    print(json.dumps(config["training"], indent=2))
    return 0


# --- register -----------------------------------------------------------------------------------
def _cmd_register(args: argparse.Namespace) -> int:
    import tempfile

    from needle_steering.perception.registration import register_files

    labels_path = args.labels
    with tempfile.TemporaryDirectory(prefix="needle_steering_register_") as scratch:
        if labels_path is None:
            from needle_steering.perception.io import read_volume, write_volume
            from needle_steering.perception.segment import segment_volume

            print("no --labels given: segmenting the fixed CT first", file=sys.stderr, flush=True)
            result = segment_volume(read_volume(args.fixed), backend="auto", device="auto", modality="ct")
            labels_path = str(write_volume(result.labels, Path(scratch) / "fixed_labels.nii.gz"))
        levels = None
        if args.levels:
            from needle_steering.perception.labels import parse_level_range

            levels = parse_level_range(args.levels)
        report = register_files(args.fixed, args.moving, labels_path, args.moving_labels, levels=levels)
    if args.json:
        _print_json(report)
    else:
        for name, level in report["levels"].items():
            if level["status"] == "ok":
                print(f"{name:4s} ok       fitness {level['fitness']:.3f}  rmse {level['rmse_mm']:.2f} mm")
            else:
                print(f"{name:4s} REFUSED  {level['reason']}")
        print(f"status {report['status']} in {report['seconds']:.1f} s")
    if report["status"] == "refused":
        print("needle-steering register: error: no level could be registered reliably", file=sys.stderr)
        return EXIT_ERROR
    return 0 if report["status"] == "ok" else EXIT_THRESHOLD_FAILED


# --- plan / report --------------------------------------------------------------------------------
def _parse_point(text: str) -> list[float]:
    from needle_steering.errors import PlanningError

    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise PlanningError(f"--biopsy-target must be X,Y,Z in LPS mm, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and abs(v) < 1e5 for v in values):
        raise PlanningError(f"--biopsy-target must be three finite numbers X,Y,Z in LPS mm, got {text!r}")
    return values


def _cmd_plan(args: argparse.Namespace) -> int:
    from needle_steering.perception.io import read_volume
    from needle_steering.perception.labels import parse_level_range
    from needle_steering.planning import plan_case, save_plan

    levels = parse_level_range(args.levels) if args.levels else []
    target = _parse_point(args.biopsy_target) if args.biopsy_target else None
    ct = read_volume(args.image)
    labels = read_volume(args.labels)
    result = plan_case(ct, labels, levels, biopsy_target_lps_mm=target, steerable=args.steerable)
    out = save_plan(result.plan_document, args.out)
    summary = {
        "plan": str(out),
        "sha256": result.plan_document.sha256,
        "trajectories": len(result.plan_document.trajectories),
        "seconds": round(result.seconds, 3),
        "skipped": dict(result.skipped),
    }
    if args.json:
        _print_json(summary)
        return 0
    print(f"{'id':22s} {'kind':16s} {'level':5s} {'side':5s} {'diam':>5s} {'len':>5s}  grade")
    for traj in result.plan_document.trajectories:
        grade = traj.metrics.get("predicted_grade", "-")
        print(f"{traj.id:22s} {traj.kind:16s} {traj.level or '-':5s} {traj.side or '-':5s} "
              f"{traj.diameter_mm:5.1f} {traj.length_mm:5.1f}  {grade}")
    for key, reason in result.skipped.items():
        print(f"skipped {key}: {reason}")
    print(f"plan {out} sha256 {result.plan_document.sha256[:16]}... in {result.seconds:.2f} s")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from needle_steering.errors import PlanDocumentError
    from needle_steering.perception.io import read_volume
    from needle_steering.planning import load_plan, volume_sha256, write_report

    plan = load_plan(args.plan)
    image_path = args.image or plan.image.source
    labels_path = args.labels or plan.labels.source
    if not image_path or not labels_path:
        raise PlanDocumentError(f"{args.plan}: plan does not record its CT/labels paths; pass --image and --labels")
    ct = read_volume(image_path)
    labels = read_volume(labels_path)
    for what, volume, info in (("CT", ct, plan.image), ("label map", labels, plan.labels)):
        if volume_sha256(volume) != info.sha256:
            raise PlanDocumentError(
                f"{what} {volume.metadata.get('source')} is not the one the plan was made on "
                f"(sha256 {volume_sha256(volume)[:12]}... != {info.sha256[:12]}...)"
            )
    out = write_report(plan, ct, labels, args.out)
    print(f"report {out}")
    return 0


# --- demo -----------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from needle_steering.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="needle-steering",
        description="Image-guided spine interventions: perception, planning, control and simulation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="geometry and intensity summary of an image or DICOM folder")
    p.add_argument("image", help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--series-uid", help="series to read when a DICOM folder holds several")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf voxels")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("bench", help="run the registered benchmarks")
    p.add_argument("--only", action="append", metavar="NAME", help="benchmark name (repeat or comma-separate)")
    p.add_argument("--list", action="store_true", help="list benchmarks and targets")
    p.add_argument("--json", action="store_true", help='print {"NAME": {"value": v, "unit": u}}')
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("phantom", help="generate a synthetic spine CT/CBCT with ground-truth labels")
    p.add_argument("--out", required=True, help="output folder (ct.nii.gz, labels.nii.gz, meta.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", default="T12-L5", help="e.g. T10-L5 or L1,L2 (S = sacrum)")
    p.add_argument("--modality", choices=("ct", "cbct"), default="ct")
    p.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm")
    p.add_argument("--lesion", action="store_true", help="add one lytic or blastic lesion")
    p.add_argument("--bone-quality", type=float, default=1.0, help="1 normal .. 0 severely osteoporotic")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_phantom)

    p = sub.add_parser("segment", help="segment and name the vertebrae of a CT or CBCT")
    p.add_argument("image", help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--out", default="labels.nii.gz", help="label map to write (VerSe ids, input grid)")
    p.add_argument("--backend", choices=("auto", "classical", "learned"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--modality", choices=("ct", "cbct"), default="ct")
    p.add_argument("--series-uid", help="series to read when a DICOM folder holds several")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_segment)

    p = sub.add_parser("train-seg", help="train the learned vertebra segmenter on synthetic phantoms")
    p.add_argument("--out", required=True, help="output folder (vertebra_seg.pt, vertebra_seg.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples", type=int, default=32, help="phantoms generated for training")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="stop after MIN minutes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train_seg)

    p = sub.add_parser("register", help="rigid per-vertebra registration of a CBCT to the pre-operative CT")
    p.add_argument("--fixed", required=True, help="pre-operative CT (file or DICOM folder)")
    p.add_argument("--moving", required=True, help="intra-operative CBCT (file or DICOM folder)")
    p.add_argument("--labels", help="VerSe label map on the CT grid (default: segment the CT)")
    p.add_argument("--moving-labels", help="optional VerSe label map on the CBCT grid")
    p.add_argument("--levels", help="levels to register, e.g. L1-L5 (default: all labelled)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_register)

    p = sub.add_parser("plan", help="pedicle-screw, biopsy and steerable-needle planning")
    p.add_argument("image", help="planning CT (file or DICOM folder), HU")
    p.add_argument("--labels", required=True, help="VerSe label map on the CT grid")
    p.add_argument("--levels", default="L1-L5", help="levels for bilateral pedicle screws ('' for none)")
    p.add_argument("--biopsy-target", metavar="X,Y,Z",
                   help="biopsy target, LPS mm (write --biopsy-target=-1,2,3 when X < 0)")
    p.add_argument("--steerable", action="store_true", help="also plan a curved steerable-needle path")
    p.add_argument("--out", default="plan.json", help="plan document to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_plan)

    p = sub.add_parser("report", help="self-contained HTML report of a plan for the surgeon")
    p.add_argument("plan", help="plan document (JSON)")
    p.add_argument("--out", default="report.html")
    p.add_argument("--image", help="planning CT (default: the path recorded in the plan)")
    p.add_argument("--labels", help="label map (default: the path recorded in the plan)")
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("demo", help="end-to-end demonstration on a generated patient")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(handler=_cmd_demo)

    for register in _EXTRA_SUBCOMMANDS:
        register(sub)
    return parser


def _lazy_subcommand(module: str, function: str) -> Callable[[Any], None]:
    """A registrar that imports ``module`` only to add its subcommand (modules keep heavy imports inside)."""

    def register(subparsers: Any) -> None:
        import importlib

        getattr(importlib.import_module(module), function)(subparsers)

    return register


#: Functions adding the subcommands that live beside their layer (each takes the subparsers object).
_EXTRA_SUBCOMMANDS: list[Callable[[Any], None]] = [
    _lazy_subcommand("needle_steering.nodes.bringup", "add_bringup_subcommand"),
    _lazy_subcommand("needle_steering.sim.regress", "add_regress_subcommand"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``needle-steering`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except NeedleSteeringError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"needle-steering {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, MemoryError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"needle-steering {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"needle-steering {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
