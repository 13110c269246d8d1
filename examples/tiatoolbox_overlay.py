"""Run TIAToolbox's PatchPredictor with an Equi-ViT on a slide; save a class overlay PNG.

    python examples/tiatoolbox_overlay.py                      # the bundle's demo model
    python examples/tiatoolbox_overlay.py --slide my.svs --model my_checkpoint.pt \\
        --out overlay.png --batch-size 64 --device cuda

Defaults: the real slide ``$EQUIVIT_DATA/slides/CMU-1-Small-Region.svs`` (``EQUIVIT_DATA``
defaults to ``../shared/data``) and the MONAI bundle's ``models/model.pt`` (Equi-ViT-RI-tiny
trained on LC25000 lung tiles: a demo, not a diagnostic model). A registered model name
(e.g. ``equivit_ri_tiny_patch16_224``) gives random weights with classes ``0..K-1``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tiatoolbox.models.engine.patch_predictor import PatchPredictor

from equivit_plugin.tiatoolbox import EquiViTClassifier, make_ioconfig
from equivit_plugin.tiatoolbox.overlay import save_prediction_overlay

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EQUIVIT_DATA", ROOT.parent / "shared" / "data"))


@dataclass
class OverlayResult:
    """What the example produced: the PNG and the engine's per-patch output it drew."""

    overlay: Path
    coordinates: np.ndarray  # (N, 4) boxes at --mpp
    predictions: np.ndarray  # (N,) class indices
    class_dict: dict[int, str]


def main(argv: list[str] | None = None) -> OverlayResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA / "slides" / "CMU-1-Small-Region.svs")
    parser.add_argument("--model", default=str(ROOT / "monai_bundle" / "models" / "model.pt"),
                        help="checkpoint path or registered model name")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes for a registered model name (random weights)")
    parser.add_argument("--out", type=Path, default=Path("prediction_overlay.png"))
    parser.add_argument("--mpp", type=float, default=0.5, help="patch resolution (um/px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not args.slide.is_file():
        parser.error(f"--slide {args.slide} does not exist (set EQUIVIT_DATA or pass --slide)")

    model = EquiViTClassifier.create(args.model, args.num_classes)
    class_dict = model.class_dict or {k: str(k) for k in range(model.net.num_classes)}
    ioconfig = make_ioconfig(model.img_size, resolution=args.mpp)
    with tempfile.TemporaryDirectory() as tmp:
        output = PatchPredictor(model=model, batch_size=args.batch_size,
                                device=args.device).run(
            images=[args.slide], patch_mode=False, ioconfig=ioconfig, device=args.device,
            save_dir=Path(tmp) / "predictions", output_type="zarr")
        group = zarr.open(str(output[args.slide]), mode="r")
        coordinates = np.asarray(group["coordinates"])
        predictions = np.asarray(group["predictions"])
    counts = {class_dict[k]: int(n) for k, n in zip(*np.unique(predictions, return_counts=True))}
    print(f"{len(predictions)} tissue patches: {counts}")
    path = save_prediction_overlay(args.slide, coordinates, predictions, class_dict, args.out,
                                   resolution=args.mpp)
    print(f"overlay written to {path}")
    return OverlayResult(path, coordinates, predictions, class_dict)


if __name__ == "__main__":
    main()
