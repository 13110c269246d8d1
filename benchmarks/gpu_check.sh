#!/usr/bin/env bash
# Every GPU check of the project, on the GPU machine (Python 3.12 with torch and timm, no
# network, no MONAI/ignite/fire/TIAToolbox): install the carried wheels, then run
# benchmarks/gpu_check.py. From the repository root, carrying .whl and .device_data:
#
#     bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --quick or --checks parity]
#
# Writes $OUT/gpu_check.json, .md and .log (benchmarks/results/ when OUT is unset); exits with
# gpu_check.py's code (0: every check that ran passed). The package is not pip-installed
# there: the repository root on PYTHONPATH makes equivit_plugin importable.
set -o pipefail
cd "$(dirname "$0")/.." || exit
OUT="${OUT:-benchmarks/results}"
SITE=/tmp/site
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE:$PWD" || exit

# TIAToolbox imports SimpleITK (52 MB; used only for image registration) and imagecodecs
# (24 MB; JPEG/JPEG 2000/LZW codecs for TIFF tiles read through tifffile) when it is imported.
# SimpleITK does not travel; imagecodecs does (.whl: the realistic 40x slide's JPEG tiles need
# it). Where one is missing, a stub stands in: the imagecodecs stub hands tifffile the
# pure-Python codecs tifffile ships (zlib, lzma, packbits, delta...), as tifffile does without
# imagecodecs; .svs slides are then read by OpenSlide alone (whose library decodes their
# JPEGs), and the slides check cannot write its JPEG slide (one error row).
if ! python3 -c "import SimpleITK" 2>/dev/null; then
    mkdir -p "$SITE/SimpleITK"
    cat > "$SITE/SimpleITK/__init__.py" <<'EOF'
"""Import stub written by benchmarks/gpu_check.sh: SimpleITK is not installed."""


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(f"SimpleITK.{self._name}: SimpleITK is not installed (stub)")

    def __getattr__(self, name):
        return _Missing(f"{self._name}.{name}")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
EOF
    echo "gpu_check.sh: SimpleITK stub in $SITE" >&2
fi
if ! python3 -c "import imagecodecs" 2>/dev/null; then
    mkdir -p "$SITE/imagecodecs"
    cat > "$SITE/imagecodecs/__init__.py" <<'EOF'
"""Import stub written by benchmarks/gpu_check.sh: imagecodecs is not installed; tifffile's
own pure-Python codecs stand in (no JPEG, JPEG 2000 or LZW)."""

from tifffile import _imagecodecs as _fallback

globals().update({k: v for k, v in vars(_fallback).items() if not k.startswith("_")})
__version__ = "0+stub"
EOF
    cat > "$SITE/imagecodecs/numcodecs.py" <<'EOF'
"""Import stub of imagecodecs.numcodecs: codecs that register but cannot code."""

from numcodecs.abc import Codec


class _Unavailable(Codec):
    codec_id = "imagecodecs_stub"

    def encode(self, buf):
        raise ImportError(f"{type(self).__name__}: imagecodecs is not installed (stub)")

    decode = encode


class Jpeg(_Unavailable):
    codec_id = "imagecodecs_jpeg"


class Jpeg2k(_Unavailable):
    codec_id = "imagecodecs_jpeg2k"


class Lzw(_Unavailable):
    codec_id = "imagecodecs_lzw"


class Delta(_Unavailable):
    codec_id = "imagecodecs_delta"


def register_codecs(*args, **kwargs):
    """Nothing to register."""
EOF
    echo "gpu_check.sh: imagecodecs stub in $SITE" >&2
fi

if [ -d .device_data ]; then
    export EQUIVIT_DATA="$PWD/.device_data"
fi
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
