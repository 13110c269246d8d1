"""The ``equivit`` command (console script ``equivit = equivit_plugin.cli:main``).

Subcommands:

* ``equivit extract-features SLIDES... --out DIR`` -- MIL features per slide
  (:func:`equivit_plugin.features.extract_features`; see ``docs/features.md``).

Exit codes: 0 all slides ok (done or already complete), 1 some slides failed (listed in the
summary), 2 usage errors (bad arguments, nothing processed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]

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


def _add_extract_features(subparsers: argparse._SubParsersAction) -> None:
    from equivit_plugin.features.extract import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "extract-features",
        help="embed the tissue tiles of whole-slide images into CLAM/TRIDENT-style .h5 files",
        description=(
            "Embed the tissue tiles of whole-slide images with an Equi-ViT (or any timm) "
            "encoder. Writes DIR/h5_files/<slide_stem>.h5 per slide (datasets 'features' "
            "(N, D) and 'coords' (N, 2) level-0 top-left x, y) and, with --also-pt, "
            "DIR/pt_files/<slide_stem>.pt. Complete outputs are skipped on a rerun; failed "
            "slides are listed in the summary (exit code 1). Under torchrun each rank takes a "
            "share of the slides."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("slides", nargs="+", metavar="SLIDES",
                        help="slide files, directories, glob patterns, or .txt/.csv lists of "
                             "paths (CSV: column 'path' or 'slide', else the first)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="registered timm model name (random weights: a warning says so) "
                             "or a checkpoint written by equivit_plugin.models.save_checkpoint")
    parser.add_argument("--mpp", type=_positive_float, default=0.5,
                        help="target resolution in micrometres per pixel (0.5 = 20x)")
    parser.add_argument("--slide-mpp", type=_positive_float, default=None,
                        help="resolution of slides without resolution metadata (PNG/JPEG...)")
    parser.add_argument("--patch-size", type=_positive_int, default=224,
                        help="tile side in pixels at --mpp (the model's input size)")
    parser.add_argument("--stride", type=_positive_int, default=None,
                        help="grid step in pixels at --mpp (default: --patch-size)")
    parser.add_argument("--tissue-mask", choices=["morphological", "otsu", "none"],
                        default="morphological",
                        help="TIAToolbox tissue masker, or 'none' for every tile")
    parser.add_argument("--min-tissue", type=_fraction, default=0.0,
                        help="minimum tissue fraction of a kept tile (0: any tissue)")
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="tiles per forward pass")
    parser.add_argument("--workers", type=_natural_int, default=None,
                        help="DataLoader processes reading tiles (default: half the CPUs, "
                             "at most 4; 0: read in the main process)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="compute precision (bf16/fp16: autocast)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
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
    parser.set_defaults(handler=_run_extract_features)


def _run_extract_features(args: argparse.Namespace) -> int:
    from equivit_plugin.features.extract import ExtractionConfigError, extract_features

    try:
        summary = extract_features(
            args.slides, args.out, model=args.model, mpp=args.mpp, slide_mpp=args.slide_mpp,
            patch_size=args.patch_size, stride=args.stride, tissue_mask=args.tissue_mask,
            min_tissue=args.min_tissue, batch_size=args.batch_size, workers=args.workers,
            device=args.device, precision=args.precision, dtype=args.dtype,
            also_pt=args.also_pt, overwrite=args.overwrite, d4_average=args.d4_average,
            seed=args.seed, verbose=args.verbose)
    except ExtractionConfigError as error:
        print(f"equivit extract-features: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if summary.ok else EXIT_FAILED_SLIDES


def build_parser() -> argparse.ArgumentParser:
    """The ``equivit`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="equivit", description="equivit-plugin command-line tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_extract_features(subparsers)
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
