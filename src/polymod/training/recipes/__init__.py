"""Training recipes of the survey (§6): each a short function over the trainer.

:mod:`~polymod.training.recipes.madx` (language modules, stacked task modules,
zero-shot transfer), :mod:`~polymod.training.recipes.continual` (a module per
task, earlier ones frozen), :mod:`~polymod.training.recipes.fusion`
(AdapterFusion), :mod:`~polymod.training.recipes.skills` (Polytropon: skills
and allocation; few-shot new tasks) and :mod:`~polymod.training.recipes.hypernetwork`
(hypernetworks; a new task is a new embedding); :mod:`~polymod.training.recipes.phatgoose`
(PHATGOOSE gates for a published module). Two-phase sparse fine-tuning
(LT-SFT) is :func:`polymod.training.lt_sft.train_lt_sft`. See docs/training.md.
"""

import sys

from polymod.training import lt_sft
from polymod.training.recipes import hypernetwork, skills

# Renamed in 0.2 (one file name, one meaning: `polytropon` is the router, `hyper` read as the hub,
# `lt_sft` existed twice). docs/training.md showed the old recipe paths, so they stay aliases.
for _old, _new in (("polytropon", skills), ("hyper", hypernetwork), ("lt_sft", lt_sft)):
    sys.modules.setdefault(f"{__name__}.{_old}", _new)
    globals().setdefault(_old, _new)
