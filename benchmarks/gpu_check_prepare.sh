#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh carries to the GPU machine (no network there; Python
# 3.12 with torch, timm, h5py... but without MONAI, ignite, fire and TIAToolbox):
#   .whl/          the missing wheels, CPython 3.12 manylinux x86_64 (about 49 MiB: imagecodecs,
#                  24 MiB, writes and decodes the JPEG tiles of the realistic 40x slide)
#   .device_data/  the real slide and 30 LC25000 tiles per class from $EQUIVIT_DATA (3 MiB)
# Both are ignored by git (.git/info/exclude); carry them: run(carry=[".whl", ".device_data"]).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${EQUIVIT_DATA:-../shared/data}"
for entry in /.whl/ /.device_data/; do
    grep -qxF "$entry" .git/info/exclude 2>/dev/null || echo "$entry" >> .git/info/exclude
done

WHEELS=(
    monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0
    tiatoolbox==2.1.3 dask==2026.7.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
    google-crc32c==1.9.0 shapely==2.1.2 openslide-python==1.4.3 openslide-bin==4.0.1.1
    defusedxml==0.7.1 universal-pathlib==0.2.6 umap-learn==0.5.11 pynndescent==0.7.0
    importlib-metadata==10.2.0 lazy-importer==0.1.0 imagecodecs==2026.1.14
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

mkdir -p .device_data/slides .device_data/lc25000_lung_train
cp "$DATA/slides/CMU-1-Small-Region.svs" .device_data/slides/
python3 - "$DATA/lc25000_lung_train" .device_data/lc25000_lung_train <<'PY'
"""30 tiles per class with their MANIFEST.csv rows."""
import csv, shutil, sys
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
with open(source / "MANIFEST.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
column = next(c for c in ("file", "path") if c in rows[0])
kept, per_class = [], {}
for row in sorted(rows, key=lambda r: r[column]):
    label = Path(row[column]).parts[0]
    if per_class.get(label, 0) < 30:
        per_class[label] = per_class.get(label, 0) + 1
        (target / row[column]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / row[column], target / row[column])
        kept.append(row)
with open(target / "MANIFEST.csv", "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(kept)
PY
du -sh .whl .device_data
