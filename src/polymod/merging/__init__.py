"""Offline merging: ``pm.merge`` methods, LoRA merge semantics, task vectors,
streaming checkpoint merges and recipes, LoraHub (see DESIGN.md).

Forward-time aggregation (weights applied inside a forward pass) lives in
:mod:`polymod.aggregation`; what is here runs once, before inference, and
produces a new module or checkpoint.
"""

import sys

from polymod.merging import lorahub, merge, streaming

# Until 0.2 the merging code lived in ``polymod.aggregation``, and the docs showed
# ``from polymod.aggregation.merge import merge`` (and ``.checkpoint`` / ``.lorahub``).
# Keep those three documented import paths working by aliasing the moved modules;
# the alias is set here, above aggregation, so aggregation never imports upward.
for _old, _new in (("merge", merge), ("checkpoint", streaming), ("lorahub", lorahub)):
    sys.modules.setdefault(f"polymod.aggregation.{_old}", _new)
