"""MONAI bundle support: what ``monai_bundle/configs/*.json`` call via ``_target_`` (by module
path, e.g. ``equivit_plugin.bundle.data.tile_transforms``; nothing is re-exported here).

- :mod:`~equivit_plugin.bundle.data`: tile discovery, group-aware splits, MONAI transforms;
- :mod:`~equivit_plugin.bundle.batches`: what evaluation and inference share: loaders that skip
  unreadable tiles (and say which), batch file names, progress, the batch -> logits function;
- :mod:`~equivit_plugin.bundle.training`: atomic best/last checkpoints, resume, metrics JSON,
  warm-up cosine schedule, distributed helpers;
- :mod:`~equivit_plugin.bundle.evaluation`: accuracy under rotation (JSON, polar plot);
- :mod:`~equivit_plugin.bundle.inference`: resumable prediction CSV, demo tiles from
  TIAToolbox's image.
"""
