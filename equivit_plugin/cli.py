"""The ``equivit`` command (console script ``equivit = equivit_plugin.cli:main``).

Subcommands:

* ``equivit extract-features SLIDES... --out DIR`` -- MIL features per slide
  (:func:`equivit_plugin.features.extract_features`; see ``docs/features.md``);
  ``equivit extract-features --demo --out DIR`` runs it on a packaged H&E slide.
* ``equivit rotation-report --model NAME SLIDES... --out DIR`` -- how stable each encoder's
  features are when tissue is rotated or shifted
  (:func:`equivit_plugin.robustness.rotation_report`; see ``docs/rotation_report.md``).
* ``equivit distill --teacher MODEL (--tiles DIR | --slides SLIDES) --out student.pt`` --
  distil a teacher's features into an exactly rotation-invariant Equi-ViT
  (:func:`equivit_plugin.distill.distill`; see ``docs/distillation.md``).
* ``equivit export MODEL --format torchscript|onnx --out FILE`` -- a TorchScript or ONNX file
  checked against the eager model (:func:`equivit_plugin.export.export_model`; see
  ``docs/export.md``).

Exit codes: 0 all slides ok (done or already complete; the report written; the export
written and checked), 1 some slides failed (listed in the summary; a slide unreadable while
the report reads it; an exported file that does not compute what the model does, not
written), 2 usage errors (bad arguments, nothing processed).

Importing this module, ``--help`` and usage errors cost no torch, timm or TIAToolbox: the
choices and defaults come from torch-free modules (:mod:`equivit_plugin.features.config`,
:mod:`equivit_plugin.robustness.config`, :mod:`equivit_plugin.utils.precision`); the
pipelines are imported only to run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .distill.config import (
    DEFAULT_MAX_SHIFT,
    DEFAULT_STRIDE,
    DEFAULT_STUDENT,
)
from .distill.config import TISSUE_MASKS as DISTILL_TISSUE_MASKS
from .features.config import (
    DECODERS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MODEL,
    DEFAULT_MPP,
    DEFAULT_PATCH_SIZE,
    OUT_DTYPES,
    TISSUE_MASKS,
)
from .robustness.config import (
    DEFAULT_ANGLE_STEP,
    DEFAULT_K,
    DEFAULT_MIN_TISSUE,
    DEFAULT_REGION_STRIDE,
    DEFAULT_REGIONS,
    DEFAULT_SHIFTS,
)
from .robustness.config import DEFAULT_BATCH_SIZE as DEFAULT_REPORT_BATCH_SIZE
from .utils.precision import PRECISIONS

__all__ = ["build_parser", "cli_message", "format_encoders", "format_report_table", "main"]

EXIT_OK, EXIT_FAILED_SLIDES, EXIT_USAGE = 0, 1, 2


def _number(kind: Callable[[str], float], low: float, inclusive: bool,
            what: str) -> Callable[[str], float]:
    """An argparse ``type`` that also checks the lower bound (argparse names the option)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (value == low and not inclusive) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 0, False, "a positive integer")
_natural_int = _number(int, 0, True, "an integer >= 0")
_positive_float = _number(float, 0.0, False, "a positive number")
_fraction = _number(float, 0.0, True, "a fraction in [0, 1)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="*", metavar="SLIDES",
                        help="slide files, directories, glob patterns, or .txt/.csv lists of "
                             "paths (CSV: column 'path' or 'slide', else the first)")
    parser.add_argument("--demo", action="store_true",
                        help="no SLIDES: run on a small slide made (once, cached) from "
                             "TIAToolbox's packaged H&E image, with the MONAI bundle's demo "
                             "checkpoint, and draw the features on its thumbnail")
    parser.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                        help="output folder")
    parser.add_argument("--model", default=None,
                        help=f"a foundation model by name with --weights (uni_v1, virchow2, "
                             f"kaiko-vits16...: `equivit encoders` lists them), a checkpoint "
                             f"written by equivit_plugin.models.save_checkpoint (a distilled "
                             f"student...), or a registered timm model name (random weights: a "
                             f"warning says so) (default: {DEFAULT_MODEL}; with --demo: the "
                             f"bundle's demo checkpoint)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="the foundation model's released weights: its file "
                             "(pytorch_model.bin...) or folder (transformers models: the folder "
                             "with config.json)")
    parser.add_argument("--mpp", type=_positive_float, default=DEFAULT_MPP,
                        help="target resolution in micrometres per pixel (0.5 = 20x)")
    parser.add_argument("--slide-mpp", type=_positive_float, default=None,
                        help="resolution of slides without resolution metadata (PNG/JPEG...)")
    parser.add_argument("--patch-size", type=_positive_int, default=None,
                        help=f"tile side in pixels at --mpp, the model's input size (default: "
                             f"the model's; {DEFAULT_PATCH_SIZE} for a registered timm name)")
    parser.add_argument("--stride", type=_positive_int, default=None,
                        help="grid step in pixels at --mpp (default: --patch-size)")
    parser.add_argument("--context", type=_natural_int, default=None, metavar="PX",
                        help="side in pixels at --mpp of the square region, centred on each "
                             "cell, that the model embeds (coords stay the cells'); default: "
                             "the cell, except for a model that sees only its inscribed disc "
                             "(equivit_disc), which gets the smallest multiple of its patch "
                             "size whose disc covers the whole cell (320 for 224 px cells); "
                             "0 or --patch-size: the cell alone")
    parser.add_argument("--tissue-mask", choices=TISSUE_MASKS, default=TISSUE_MASKS[0],
                        help="TIAToolbox tissue masker, or 'none' for every tile")
    parser.add_argument("--min-tissue", type=_fraction, default=0.0,
                        help="minimum tissue fraction of a kept tile (0: any tissue)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                        help="tiles per forward pass")
    parser.add_argument("--workers", type=_natural_int, default=None,
                        help="DataLoader processes reading tiles for the whole run (default "
                             "from the cores available: all but one with --device cuda, one "
                             "on the CPU; 0: read in the main process)")
    parser.add_argument("--decoder", choices=DECODERS, default=DECODERS[0],
                        help="what decodes the slides' stored tiles, each once (auto: the "
                             "library TIAToolbox opens the slide with, OpenSlide for .svs; "
                             "tifffile: TIFF-based slides, faster where measured)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help="compute precision (bf16/fp16: autocast)")
    parser.add_argument("--dtype", choices=OUT_DTYPES, default=OUT_DTYPES[0],
                        help="dtype of the stored features")
    parser.add_argument("--also-pt", action="store_true",
                        help="also write CLAM's DIR/pt_files/<slide_stem>.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute slides whose output already exists")
    parser.add_argument("--d4-average", action="store_true",
                        help="average features over the 8 rotations/flips of each tile "
                             "(rotation-invariant features from any model; 8x the cost)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random weights (registered model names only)")
    parser.add_argument("--verbose", action="store_true",
                        help="progress bars even when stderr is not a terminal; a line per slide")


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python argument name -> how the command line spells it (``patch_size`` ->
    ``--patch-size``, ``slides`` -> ``SLIDES:``)."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if action.dest != "help":  # the first option of a shared dest (--model, not --weights)
            flags.setdefault(action.dest, action.option_strings[0] if action.option_strings
                             else f"{action.metavar}:")
    return flags


def cli_message(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with every Python argument (``patch_size=``) rewritten as its command-line
    flag (``--patch-size``), e.g. ``patch_size= must be a positive integer`` ->
    ``--patch-size must be a positive integer``."""
    names = sorted((re.escape(name) for name in flags), key=len, reverse=True)
    pattern = re.compile(rf"(?<![\w-])({'|'.join(names)})= ?")
    return pattern.sub(lambda match: f"{flags[match.group(1)]} ", message)


def _add_extract_features(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract-features",
        help="embed the tissue tiles of whole-slide images into CLAM/TRIDENT-style .h5 files",
        description=(
            "Embed the tissue tiles of whole-slide images with an Equi-ViT (or any timm) "
            "encoder. Writes DIR/h5_files/<slide_stem>.h5 per slide (datasets 'features' "
            "(N, D) and 'coords' (N, 2) level-0 top-left x, y) and, with --also-pt, "
            "DIR/pt_files/<slide_stem>.pt. Complete outputs are skipped on a rerun; failed "
            "slides are listed in the summary (exit code 1). Under torchrun each rank takes a "
            "share of the slides. No slide at hand? Try --demo."),
        formatter_class=_HelpFormatter)
    _add_input_options(parser)
    _add_run_options(parser)
    parser.set_defaults(handler=_run_extract_features, parser=parser)


def _usage_error(parser: argparse.ArgumentParser, message: str, usage: bool = False) -> int:
    if usage:
        parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _extract_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("weights", "mpp", "slide_mpp", "patch_size", "stride", "context", "tissue_mask",
             "min_tissue", "batch_size", "workers", "decoder", "device", "precision", "dtype",
             "also_pt",
             "overwrite", "d4_average", "seed", "verbose")
    return {name: getattr(args, name) for name in names}


def _run_demo(args: argparse.Namespace) -> int:
    from .features.demo import run_demo

    try:
        result = run_demo(args.out_dir, model=args.model, **_extract_kwargs(args))
    except RuntimeError as error:  # the demo slide failed; the summary above says why
        print(f"equivit extract-features --demo: {error}", file=sys.stderr)
        return EXIT_FAILED_SLIDES
    print(f"demo model: {result.note}")
    print(f"demo slide: {result.slide}")
    print(f"features: {result.h5}")
    print(f"overlay: {result.overlay}", flush=True)
    return EXIT_OK


def _run_extract_features(args: argparse.Namespace) -> int:
    from .features.config import ExtractionConfigError

    parser: argparse.ArgumentParser = args.parser
    if args.demo == bool(args.slides):
        return _usage_error(parser, "give SLIDES or --demo, not both" if args.demo
                            else "the following arguments are required: SLIDES (or --demo)",
                            usage=True)
    try:
        if args.demo:
            return _run_demo(args)
        from .features.extract import extract_features

        summary = extract_features(args.slides, args.out_dir, model=args.model or DEFAULT_MODEL,
                                   **_extract_kwargs(args))
    except ExtractionConfigError as error:
        return _usage_error(parser, cli_message(str(error), _flags(parser)))
    return EXIT_OK if summary.ok else EXIT_FAILED_SLIDES


def _add_rotation_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rotation-report",
        help="how stable encoders' features are when tissue is rotated or shifted",
        description=(
            "Measure how stable each encoder's pooled features are when tissue is rotated by "
            "any angle (Elphick et al., arXiv 2412.11938): tissue regions of twice the tile "
            "size are rotated about their centre by 0, --angle-step, ... degrees and their "
            "central tile is embedded (no padding is ever read); per angle the mutual-kNN "
            "similarity (k neighbours, cosine) and the mean cosine to the unrotated features. "
            "Also sub-patch shifts of the crop, alone and after an exact 90-degree turn. All "
            "models are measured on the same regions; with several slides or tile folders, "
            "over all of them and per source. Writes DIR/rotation_report.json and "
            "DIR/rotation_report.png (see docs/rotation_report.md)."),
        formatter_class=_HelpFormatter)
    parser.add_argument("slides", nargs="*", metavar="SLIDES",
                        help="slide files, directories, glob patterns, or .txt/.csv lists of "
                             "paths (CSV: column 'path' or 'slide', else the first)")
    parser.add_argument("--tiles", action="append", default=[], metavar="DIR",
                        help="a folder of tile images as one more source: each tile is the "
                             "centre of a 2T context whose rest is its mirror image; repeat "
                             "for several folders")
    parser.add_argument("--model", dest="models", action="append", default=None,
                        metavar="MODEL",
                        help=f"a foundation model by name (followed by its --weights), a "
                             f"checkpoint written by equivit_plugin.models.save_checkpoint, or a "
                             f"registered timm model name (random weights: a warning says so); "
                             f"repeat to compare models side by side (default: "
                             f"{DEFAULT_MODEL})")
    parser.add_argument("--weights", dest="models", action=_AttachWeights, metavar="PATH",
                        help="the released weights (file or folder) of the foundation model "
                             "named by the --model just before it")
    parser.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                        help="output folder")
    parser.add_argument("--regions", dest="n_regions", type=_positive_int,
                        default=DEFAULT_REGIONS, metavar="N",
                        help="tissue regions to measure, spread over the slides")
    parser.add_argument("--mpp", dest="target_mpp", type=_positive_float, default=DEFAULT_MPP,
                        metavar="MPP", help="resolution in micrometres per pixel (0.5 = 20x)")
    parser.add_argument("--slide-mpp", type=_positive_float, default=None, metavar="MPP",
                        help="resolution of slides without resolution metadata (PNG/JPEG...)")
    parser.add_argument("--angle-step", type=_positive_float, default=DEFAULT_ANGLE_STEP,
                        metavar="DEG",
                        help="degrees between angles (must divide 360); angles 0 to 360 "
                             "exclusive")
    parser.add_argument("--shifts", type=_natural_int, nargs="*",
                        default=list(DEFAULT_SHIFTS), metavar="S",
                        help="sub-patch shifts of the crop in pixels (each < half the tile "
                             "size), alone and with a 90-degree turn; none: no shift views")
    parser.add_argument("--k", type=_positive_int, default=DEFAULT_K,
                        help="neighbours of the mutual-kNN similarity (< number of regions)")
    parser.add_argument("--d4-average", action="store_true",
                        help="average features over the 8 rotations/flips of each view "
                             "(8x the cost)")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_REPORT_BATCH_SIZE,
                        metavar="N", help="views per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=_natural_int, default=0,
                        help="which regions are drawn, and the random weights of registered "
                             "names")
    parser.add_argument("--tissue-mask", choices=TISSUE_MASKS, default=TISSUE_MASKS[0],
                        help="TIAToolbox tissue masker, or 'none' for every region")
    parser.add_argument("--min-tissue", type=_fraction, default=DEFAULT_MIN_TISSUE,
                        metavar="F", help="minimum tissue fraction of a region")
    parser.add_argument("--region-stride", type=_positive_float, default=DEFAULT_REGION_STRIDE,
                        metavar="F", help="step between candidate regions, in tile sizes "
                                          "(regions are 2 tiles wide; 2 = disjoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_rotation_report, parser=parser)


class _AttachWeights(argparse.Action):
    """``--weights W``: the weights of the ``--model`` just before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        models = list(getattr(namespace, self.dest) or [])
        if not models or not isinstance(models[-1], str):
            parser.error("--weights must follow the --model it belongs to (--model uni_v1 "
                         "--weights pytorch_model.bin)")
        models[-1] = (models[-1], values)
        setattr(namespace, self.dest, models)


def _number_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report_table(report: Mapping[str, Any]) -> str:
    """The report as a compact text table, one row per model (mutual-kNN at the exact
    90-degree turns, off the grid, per shift view; mean cosine off the grid); with several
    sources, one row per model and source after its row over all of them."""
    shift_keys = list(report["models"][0]["shifts"]) if report["models"] else []
    by_source = any(model.get("sources") for model in report["models"])
    headers = ["model", *(["source"] if by_source else []), "kNN 90/180/270", "kNN off-grid",
               *(f"kNN {k}" for k in shift_keys), "cos off-grid"]
    rows = []
    for model in report["models"]:
        parts = [("all", model), *(model.get("sources") or {}).items()]
        for source, record in parts:
            summary = record["summary"]
            label = model["label"] if source == "all" else ""
            rows.append([label, *([source] if by_source else []),
                         _number_cell(summary["grid90_mutual_knn"]),
                         _number_cell(summary["off_grid_mutual_knn"]),
                         *(_number_cell(record["shifts"][k]["mutual_knn"])
                           for k in shift_keys),
                         _number_cell(summary["off_grid_mean_cosine"])])
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [headers, *rows]]
    return "\n".join(lines)


def _run_rotation_report(args: argparse.Namespace) -> int:
    from .robustness.config import RotationReportError, angles_from_step

    parser: argparse.ArgumentParser = args.parser
    if not args.slides and not args.tiles:
        return _usage_error(parser, "give SLIDES, --tiles DIR or both")
    try:
        angles = angles_from_step(args.angle_step)
        from .features.encoder import RandomWeightsWarning
        from .features.slides import SlideError
        from .robustness.report import rotation_report

        names = ("tiles", "shifts", "k", "d4_average", "batch_size", "device", "target_mpp",
                 "n_regions", "region_stride", "slide_mpp", "tissue_mask", "min_tissue", "seed",
                 "out_dir")
        with warnings.catch_warnings():
            # The report carries the random-weights note; it is printed below, once.
            warnings.simplefilter("ignore", RandomWeightsWarning)
            report = rotation_report(args.models or [DEFAULT_MODEL], args.slides,
                                     angles=angles, progress=not args.no_progress,
                                     **{n: getattr(args, n) for n in names})
    except RotationReportError as error:
        return _usage_error(parser, cli_message(str(error), _flags(parser)))
    except SlideError as error:
        print(f"equivit rotation-report: {error}", file=sys.stderr)
        return EXIT_FAILED_SLIDES
    for note in report["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    slides = ", ".join(s["path"] for s in report["sources"])
    step = f"{args.angle_step:g}"
    print(f"rotation report: {report['n_regions']} regions from {slides}; k={report['k']}, "
          f"angles every {step} deg, shifts {report['shifts'] or 'none'}"
          f"{', D4-averaged' if report['d4_average'] else ''}")
    print(format_report_table(report))
    print(f"report: {report['files']['json']}")
    print(f"plot: {report['files']['png']}", flush=True)
    return EXIT_OK


def _add_distill(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil a teacher's features into an exactly rotation-invariant Equi-ViT",
        description=(
            "Distil a frozen teacher (a foundation model or any timm ViT: a registered name, "
            "hf-hub:owner/model or a checkpoint) into an exactly rotation-invariant Equi-ViT "
            "student. Each tile's target is the teacher's pooled embedding averaged over the 8 "
            "rotations/flips, computed once and cached; the student learns it from views "
            "turned by any angle and shifted under the patch grid. The student checkpoint "
            "gives teacher-space features to extract-features --model, the TIAToolbox adapter "
            "and the rotation report. Resumable: rerun the same command to continue. Under "
            "torchrun, one process per GPU (see docs/distillation.md)."),
        formatter_class=_HelpFormatter)
    parser.add_argument("--teacher", required=True, metavar="MODEL",
                        help="a foundation model by name with --teacher-weights (uni_v1, "
                             "kaiko-vits16...: `equivit encoders`), a checkpoint, a registered "
                             "timm name, or hf-hub:owner/model")
    parser.add_argument("--teacher-weights", default=None, metavar="PATH",
                        help="the teacher's released weights (file or folder)")
    parser.add_argument("--student", default=DEFAULT_STUDENT, metavar="NAME",
                        help="registered Equi-ViT name of the student")
    parser.add_argument("--tiles", nargs="+", default=[], metavar="DIR",
                        help="folders of tile images (searched recursively; labels ignored)")
    parser.add_argument("--slides", nargs="+", default=[], metavar="SLIDES",
                        help="slides, folders, globs or .txt/.csv lists; tiles are sampled "
                             "from their tissue")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the student checkpoint to write (e.g. student.pt)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="targets cache, training state, logs, TensorBoard (default: "
                             "<out stem>.distill/ beside --out)")
    parser.add_argument("--targets-cache", default=None, metavar="FILE",
                        help="teacher-target file to use or create (default: in --work-dir, "
                             "named by the teacher and the tiles)")
    parser.add_argument("--epochs", type=_positive_int, default=10)
    parser.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                        help="views per training step")
    parser.add_argument("--lr", type=_positive_float, default=5e-4, help="peak learning rate")
    parser.add_argument("--weight-decay", type=_number(float, 0.0, True, "a number >= 0"),
                        default=0.05)
    parser.add_argument("--warmup-epochs", type=_natural_int, default=1, metavar="N")
    parser.add_argument("--cosine-weight", type=_number(float, 0.0, True, "a number >= 0"),
                        default=1.0, metavar="W", help="weight of the 1 - cosine term")
    parser.add_argument("--regression-weight",
                        type=_number(float, 0.0, True, "a number >= 0"), default=1.0,
                        metavar="W", help="weight of the normalised squared-error term")
    parser.add_argument("--max-shift", type=_natural_int, default=DEFAULT_MAX_SHIFT,
                        metavar="PX", help="largest shift of a training view, pixels")
    parser.add_argument("--no-init-from-teacher", dest="init_from_teacher",
                        action="store_false",
                        help="start the student from random weights, not the teacher's blocks")
    parser.add_argument("--val-fraction", type=_fraction, default=0.05, metavar="F",
                        help="tiles held out to measure fidelity each epoch")
    parser.add_argument("--max-tiles", type=_positive_int, default=None, metavar="N",
                        help="use at most N tiles (a random subset)")
    parser.add_argument("--mpp", dest="target_mpp", type=_positive_float, default=DEFAULT_MPP,
                        metavar="MPP", help="resolution of slide tiles (0.5 = 20x)")
    parser.add_argument("--slide-mpp", type=_positive_float, default=None, metavar="MPP",
                        help="resolution of slides without resolution metadata")
    parser.add_argument("--stride", type=_positive_int, default=DEFAULT_STRIDE, metavar="PX",
                        help="step between slide tiles at --mpp")
    parser.add_argument("--tissue-mask", choices=DISTILL_TISSUE_MASKS,
                        default=DISTILL_TISSUE_MASKS[0],
                        help="TIAToolbox tissue masker, or 'none'")
    parser.add_argument("--min-tissue", type=_fraction, default=0.5, metavar="F",
                        help="tissue fraction a slide tile's 2x context needs")
    parser.add_argument("--workers", dest="num_workers", type=_natural_int, default=4,
                        metavar="N", help="DataLoader processes")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available; under "
                             "torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start training again even if --work-dir has a training state")
    parser.add_argument("--seed", type=_natural_int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.set_defaults(handler=_run_distill, parser=parser)


def _run_distill(args: argparse.Namespace) -> int:
    from .distill.config import DistillError, DistillSettings

    parser: argparse.ArgumentParser = args.parser
    names = ("teacher", "teacher_weights", "student", "tiles", "slides", "out", "work_dir",
             "targets_cache",
             "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "cosine_weight",
             "regression_weight", "max_shift", "init_from_teacher", "val_fraction",
             "max_tiles", "target_mpp", "slide_mpp", "stride", "tissue_mask", "min_tissue",
             "num_workers", "device", "resume", "seed", "progress")
    try:
        settings = DistillSettings(**{n: getattr(args, n) for n in names})
        from .distill.run import distill

        result = distill(settings)
    except DistillError as error:
        return _usage_error(parser, cli_message(str(error), _flags(parser)))
    if int(os.environ.get("RANK", "0")):
        return EXIT_OK  # under torchrun, rank 0 reports
    for key, reason in result.unreadable.items():
        print(f"warning: left out unreadable tile {key}: {reason}", file=sys.stderr)
    fidelity = "-" if result.fidelity is None else (
        f"{result.fidelity:.4f}, centred {result.centred_fidelity:.4f}")
    print(f"distilled {args.teacher} into {args.student}: {result.n_train} training tiles, "
          f"{result.n_val} held out (fidelity, mean cosine to the target: {fidelity}), "
          f"{result.epochs_run} epoch(s) this run, {result.seconds:.0f} s")
    print(f"student: {result.out}")
    print(f"targets: {result.targets_path}")
    print(f"logs: {result.work_dir}", flush=True)
    return EXIT_OK


def _add_encoders(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "encoders",
        help="list the foundation models that --model, --teacher and load_model take by name",
        description=(
            "The pathology foundation models known by name (TRIDENT's names), each built, "
            "normalised and pooled as its own card and code say. Give the name with the "
            "weights you downloaded: equivit extract-features SLIDES --model uni_v1 --weights "
            "pytorch_model.bin. With NAME: every setting of that model and where it was read."),
        formatter_class=_HelpFormatter)
    parser.add_argument("name", nargs="?", default=None, metavar="NAME",
                        help="show one model's whole entry")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                        help="the table as text, as Markdown (docs) or as JSON")
    parser.set_defaults(handler=_run_encoders, parser=parser)


def format_encoders(format: str = "text") -> str:
    """The registry as a table (``"text"``/``"markdown"``) or JSON: name, embedding width,
    input size, resolution, embedding rule, normalisation, layout, licence, weights."""
    import json

    from .models.encoders import encoder_names, get_encoder

    specs = [get_encoder(name) for name in encoder_names()]
    if format == "json":
        return json.dumps({spec.name: {**spec.describe(), "title": spec.title,
                                       "licence": spec.licence,
                                       "weights_url": spec.weights_url,
                                       "sources": spec.sources, "notes": spec.notes,
                                       "requires": spec.requires} for spec in specs},
                          indent=2)
    headers = ["name", "model", "D", "input", "mpp", "embedding", "mean / std", "weights",
               "licence"]
    rows = [[spec.name, spec.title, str(spec.embed_dim), f"{spec.input_size}",
             f"{spec.mpp:g}", spec.embedding, spec.normalisation_label,
             spec.layout + (f" ({spec.requires.split()[0]})" if spec.requires else ""),
             spec.licence] for spec in specs]
    if format == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join([f"`{row[0]}`", *row[1:]]) + " |" for row in rows]
        return "\n".join(lines)
    rows = [row[:1] + row[2:7] + row[8:] for row in rows]
    headers = headers[:1] + headers[2:7] + headers[8:]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    width = max(len(spec.name) for spec in specs)
    where = [f"  {spec.name.ljust(width)}  {spec.weights_url}"
             + (f"; needs {spec.requires}" if spec.requires else "") for spec in specs]
    return "\n".join([*table, "", "where to get the weights (then --model NAME --weights PATH):",
                      *where])


def _run_encoders(args: argparse.Namespace) -> int:
    from .models.encoders import EMBEDDING_RULES, LAYOUTS, get_encoder

    if args.name is None:
        print(format_encoders(args.format))
        return EXIT_OK
    try:
        spec = get_encoder(args.name)
    except KeyError as error:
        return _usage_error(args.parser, str(error.args[0]))
    kwargs = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items()) or "-"
    config = ", ".join(f"{k}={v!r}" for k, v in spec.config.items())
    lines = [
        f"{spec.name}: {spec.title}",
        f"  architecture   {spec.architecture}" + (f" ({kwargs})" if spec.kwargs else ""),
        *([f"  config.json    {config}"] if config else []),
        f"  released as    {LAYOUTS[spec.layout]}",
        f"  weights        {spec.weights_url}",
        *([f"  needs          {spec.requires}"] if spec.requires else []),
        f"  embedding      {spec.embedding}: {EMBEDDING_RULES[spec.embedding]} -> "
        f"{spec.embed_dim} dims ({spec.num_prefix_tokens} prefix tokens)",
        f"  normalisation  mean {list(spec.mean)}, std {list(spec.std)}",
        f"  input          {spec.input_size} px at {spec.mpp:g} um/px (patch {spec.patch_size})",
        f"  licence        {spec.licence}",
        f"  sources        {spec.sources}",
        *([f"  note           {spec.notes}"] if spec.notes else []),
        f"  use            equivit extract-features SLIDES --model {spec.name} --weights PATH "
        f"--out DIR",
    ]
    print("\n".join(lines))
    return EXIT_OK


EXPORT_FORMAT_NAMES = ("torchscript", "onnx")  # equivit_plugin.export.EXPORT_FORMATS, torch-free


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to TorchScript or ONNX, checked against the eager model",
        description=(
            "Write MODEL as a TorchScript (.ts) or ONNX (.onnx) file whose output is the "
            "model's logits (a classifier) or pooled features (B, D), with the batch as a "
            "dynamic axis. Before the file appears it is loaded back and run (onnxruntime on "
            "the CPU) on real H&E tiles and noise: its output must equal the eager model's "
            "within --tolerance, and move no more than the model's under the 8 rotations/"
            "flips. The file carries its input size, normalisation and class names."),
        formatter_class=_HelpFormatter)
    parser.add_argument("model", metavar="MODEL",
                        help="a checkpoint (monai_bundle/models/model.pt, a distilled "
                             "student...), a registered timm name (random weights), or a "
                             "foundation model by name with --weights")
    parser.add_argument("--format", choices=EXPORT_FORMAT_NAMES, default=None,
                        help="file format (default: from --out's suffix, .ts or .onnx)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="a foundation model's released weights")
    parser.add_argument("--output", choices=("logits", "features"), default=None,
                        help="what the file computes (default: logits for a classifier, else "
                             "the pooled features)")
    parser.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset version")
    parser.add_argument("--tolerance", type=_positive_float, default=1e-4,
                        help="largest absolute difference allowed from the eager model")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="write without checking the file (ONNX checks need onnxruntime)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random weights (registered model names only)")
    parser.set_defaults(handler=_run_export, parser=parser)


def _run_export(args: argparse.Namespace) -> int:
    from .export import ExportError, export_model

    try:
        result = export_model(args.model, args.out, args.format, weights=args.weights,
                              output=args.output, opset=args.opset, tolerance=args.tolerance,
                              verify=args.verify, seed=args.seed)
    except ExportError as error:
        message = cli_message(str(error), {**_flags(args.parser), "source": "MODEL:"})
        usage = "nothing written" not in message
        if usage:
            return _usage_error(args.parser, message)
        print(f"equivit export: {message}", file=sys.stderr)
        return EXIT_FAILED_SLIDES
    print(result.summary(), flush=True)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The ``equivit`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="equivit", description="equivit-plugin command-line tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_extract_features(subparsers)
    _add_rotation_report(subparsers)
    _add_distill(subparsers)
    _add_encoders(subparsers)
    _add_export(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``equivit``; returns the exit code (``sys.exit(main())``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
