"""The bottom layer: small helpers every other layer may use (standard library only at import).

- :mod:`~equivit_plugin.utils.atomic`: files written whole or not at all (temporary file in
  the same folder, normal permissions, fsync, rename);
- :mod:`~equivit_plugin.utils.precision`: the compute-precision names (``fp32``, ``bf16``,
  ``fp16``) and their autocast dtypes;
- :mod:`~equivit_plugin.utils.lazy`: lazy package attributes (PEP 562);
- :mod:`~equivit_plugin.utils.demo_data`: TIAToolbox's packaged H&E image, the demo input.
"""
