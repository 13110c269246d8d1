"""The feature pipeline on a slide that ships with the installed packages.

``equivit extract-features --demo --out DIR`` (or :func:`run_demo`) needs no data: it writes a
small pyramidal slide once (:func:`demo_slide`, cached) from TIAToolbox's packaged H&E image,
mirrored into a ``2000 x 2000`` mosaic at 0.5 um/px, runs :func:`~.extract.extract_features`
on it with the MONAI bundle's demo checkpoint (or, without one, the default architecture with
random weights) and draws the tiles' features on the slide thumbnail (:mod:`.overlay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.atomic import atomic_path
from ..utils.demo_data import DEMO_MPP, cache_dir, demo_checkpoint, demo_he_image
from .config import DEFAULT_MODEL, H5_DIR
from .extract import extract_features
from .overlay import save_feature_overlay
from .summary import ExtractionSummary

__all__ = ["DEMO_SLIDE_NAME", "DemoResult", "demo_slide", "run_demo", "write_aperio_svs",
           "write_pyramid_tiff"]

DEMO_SLIDE_NAME = "equivit_demo_he_v1.tif"
"""File name of the cached demo slide (the version changes when its content does)."""


def write_pyramid_tiff(image: np.ndarray, mpp: float, path: str | Path, *,
                       smallest_level: int = 512, tile: int = 256,
                       description: str = "", compression: str = "jpeg") -> Path:
    """Write ``image`` as a compressed, tiled, pyramidal (Big)TIFF with its resolution.

    Level ``i`` is ``image[::2**i, ::2**i]`` (stored as SubIFDs of level 0), halved until its
    longer side is at most ``smallest_level``; each level carries its resolution
    (``1e4 / (mpp * 2**i)`` pixels per centimetre), which TIAToolbox's ``WSIReader`` reads
    as the slide's micrometres per pixel.

    Args:
        image: uint8 ``(H, W, 3)`` RGB level 0.
        mpp: micrometres per pixel of level 0.
        path: output file (``.tif``), written in place (wrap it in ``atomic_path``).
        smallest_level: stop halving once the longer side is at most this many pixels.
        tile: TIFF tile side, pixels (a multiple of 16).
        description: the ImageDescription of level 0.
        compression: tifffile's tile compression (``"jpeg"``; ``"zlib"`` needs no imagecodecs).
    """
    import tifffile

    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    levels = [image]
    while max(levels[-1].shape[:2]) > smallest_level:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    options = {"tile": (tile, tile), "compression": compression, "photometric": "rgb",
               "resolutionunit": "CENTIMETER", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, subifds=len(levels) - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                  description=description or None, **options)
        for i, level in enumerate(levels[1:], 1):
            per_cm = 1e4 / (mpp * 2**i)
            tif.write(level, subfiletype=1, resolution=(per_cm, per_cm), **options)
    return Path(path)


def write_aperio_svs(image: np.ndarray, mpp: float, path: str | Path, *, tile: int = 240,
                     quality: int = 80, downsample: int = 4, smallest_level: int = 1024,
                     magnification: float | None = None) -> Path:
    """Write ``image`` the way an Aperio scanner lays out an ``.svs``: a TIFF whose main IFD
    chain holds level 0 and its ``downsample``-fold reductions (4x, 16x... as Aperio's
    pyramids), every level JPEG-tiled (YCbCr 4:2:0, ``quality``), and an ``ImageDescription``
    in Aperio's format carrying ``MPP`` and ``AppMag``. OpenSlide reads it with its Aperio
    driver and TIAToolbox through ``OpenSlideWSIReader``, as they read a cohort's slides: a
    40x slide read at 0.5 um/px then decodes level 0 and halves it, as real ones do.

    Args:
        image: uint8 ``(H, W, 3)`` RGB level 0.
        mpp: micrometres per pixel of level 0.
        path: output file (``.svs``), written in place (wrap it in ``atomic_path``).
        tile: JPEG tile side, pixels (a multiple of 16; Aperio's is 240).
        quality: JPEG quality (Aperio's files say ``Q=70`` to ``Q=90``).
        downsample: factor between consecutive levels.
        smallest_level: stop once the longer side is at most this many pixels.
        magnification: ``AppMag`` (default ``10 / mpp``: 40 at 0.25 um/px).
    """
    import cv2
    import tifffile

    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    power = 10.0 / mpp if magnification is None else float(magnification)
    description = (f"Aperio Image Library v12.0.16 \r\n{width}x{height} [0,0 {width}x{height}] "
                   f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {power:g}|MPP = {mpp:g}")
    options = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality},
               "photometric": "rgb", "metadata": None}
    level = image
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        tif.write(level, description=description, **options)
        while max(level.shape[:2]) > smallest_level:
            # Area averaging, as a scanner's reductions are (not every n-th pixel).
            level = cv2.resize(level, (max(1, level.shape[1] // downsample),
                                       max(1, level.shape[0] // downsample)),
                               interpolation=cv2.INTER_AREA)
            tif.write(level, subfiletype=1, **options)
    return Path(path)


def demo_slide(cache: str | Path | None = None) -> Path:
    """The demo slide, written on first use and reused afterwards.

    TIAToolbox's packaged H&E image (:func:`~equivit_plugin.utils.demo_data.demo_he_image`,
    ``1000 x 1000``) mirrored into a ``2 x 2`` mosaic (``2000 x 2000`` px, tissue continuous
    across the seams) at :data:`~equivit_plugin.utils.demo_data.DEMO_MPP` um/px, as a
    JPEG-tiled pyramidal TIFF with 3 levels (:func:`write_pyramid_tiff`).

    Args:
        cache: folder of the slide (default :func:`~equivit_plugin.utils.demo_data.cache_dir`).

    Returns:
        ``<cache>/equivit_demo_he_v1.tif``.
    """
    path = Path(cache if cache is not None else cache_dir()) / DEMO_SLIDE_NAME
    if path.is_file():
        return path
    image = demo_he_image()
    mosaic = np.concatenate([np.concatenate([image, image[:, ::-1]], axis=1),
                             np.concatenate([image[::-1], image[::-1, ::-1]], axis=1)], axis=0)
    description = (f"equivit-plugin demo slide: tiatoolbox.data.stain_norm_target() mirrored "
                   f"2x2, {mosaic.shape[1]}x{mosaic.shape[0]} px, MPP = {DEMO_MPP}")
    with atomic_path(path) as tmp:  # concurrent first runs each write whole files
        write_pyramid_tiff(mosaic, DEMO_MPP, tmp, description=description)
    return path


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        slide: the demo slide (cached).
        h5: its feature file, ``<out_dir>/h5_files/<stem>.h5``.
        overlay: the PNG of the tiles coloured by their features' first principal component.
        model: the encoder used (checkpoint path or registered name).
        note: why that encoder (the bundle's demo checkpoint, or random weights).
        summary: the extraction summary.
    """

    slide: Path
    h5: Path
    overlay: Path
    model: str
    note: str
    summary: ExtractionSummary


def _demo_model(model: str | Path | None) -> tuple[str, str]:
    if model is not None:
        return str(model), f"model {model} (as given)"
    checkpoint = demo_checkpoint()
    if checkpoint is not None:
        return str(checkpoint), f"the MONAI bundle's demo checkpoint {checkpoint}"
    return DEFAULT_MODEL, (f"no demo checkpoint (monai_bundle/models/model.pt is not beside "
                           f"the package, e.g. a wheel install): {DEFAULT_MODEL} with RANDOM "
                           f"weights, so the features and the overlay only show the pipeline "
                           f"at work")


def run_demo(out_dir: str | Path, *, model: str | Path | None = None,
             cache: str | Path | None = None, print_summary: bool = True,
             **extract_kwargs: Any) -> DemoResult:
    """Run the whole feature pipeline on the demo slide and draw the result.

    Args:
        out_dir: output folder (``h5_files/`` and ``<stem>_features.png`` go there).
        model: encoder (default: the bundle's demo checkpoint when the package runs from a
            source checkout, else :data:`~.config.DEFAULT_MODEL` with random weights).
        cache: folder of the cached demo slide (see :func:`demo_slide`).
        print_summary: print the extraction summary.
        **extract_kwargs: any other :func:`~.extract.extract_features` argument.

    Returns:
        The :class:`DemoResult`; ``result.summary.ok`` says whether the slide went through.

    Raises:
        ExtractionConfigError: bad arguments (as :func:`~.extract.extract_features`).
        RuntimeError: the demo slide failed (the message gives the reason).
    """
    slide = demo_slide(cache)
    name, note = _demo_model(model)
    summary = extract_features([slide], out_dir, model=name, print_summary=print_summary,
                               **extract_kwargs)
    if not summary.ok:
        raise RuntimeError(f"the demo slide {slide} failed: {summary.failed[0][1]}")
    h5 = Path(out_dir) / H5_DIR / f"{slide.stem}.h5"
    overlay = save_feature_overlay(slide, h5, Path(out_dir) / f"{slide.stem}_features.png")
    return DemoResult(slide=slide, h5=h5, overlay=overlay, model=name, note=note,
                      summary=summary)
