"""Training recipes of the survey (§6): each a short function over the trainer.

:mod:`~polymod.training.recipes.madx` (language modules, stacked task modules,
zero-shot transfer), :mod:`~polymod.training.recipes.continual` (a module per
task, earlier ones frozen), :mod:`~polymod.training.recipes.fusion`
(AdapterFusion), :mod:`~polymod.training.recipes.polytropon` (skills and
allocation; few-shot new tasks), :mod:`~polymod.training.recipes.hyper`
(hypernetworks; a new task is a new embedding) and
:mod:`~polymod.training.recipes.lt_sft` (two-phase sparse fine-tuning).
See docs/training.md.
"""
