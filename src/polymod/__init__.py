"""polymod: modular deep learning — modules, routing, aggregation and a hub.

The public API (see the README)::

    import polymod as pm
    model = pm.Modular(host)
    model.add("task", pm.LoRA(rank=8, sites="attn.q|attn.v"))
    model.use("task")                                   # or pm.Stack / pm.Mix / pm.Parallel
    with model.route(["a", "b", "a"]):                  # one composition per row
        host(**batch)
    merged = pm.merge([model["a"], model["b"]], method="ties", density=0.2)
"""

from polymod import format, hub, interop, swarm
from polymod.aggregation.mixers import register_mixer
from polymod.bundle import load_all, save_all
from polymod.card import Card, Lineage, Parent
from polymod.compose import Mix, Parallel, Stack
from polymod.errors import (
    CompositionError,
    ConfigError,
    FormatError,
    HostMismatchWarning,
    HubError,
    InactiveModuleWarning,
    IncompatibleHostError,
    PolymodError,
    SiteNotFoundError,
    StateError,
    UnknownArgumentError,
    UnknownModuleError,
)
from polymod.format import load, save
from polymod.hub.composition import load_composition
from polymod.hub.pretrained import from_pretrained
from polymod.interop import read_adapters, read_peft, write_peft
from polymod.interop.peft import read_peft_modules
from polymod.merging.cluster import Clustering, cluster
from polymod.merging.genknowsub import gen_know_sub
from polymod.merging.lorahub import few_shot_loss, lorahub
from polymod.merging.merge import merge
from polymod.merging.streaming import merge_checkpoints, task_vector
from polymod.modular import AttachReport, Modular
from polymod.modules import (
    IA3,
    Adapter,
    Delta,
    Head,
    HyperLoRA,
    Invertible,
    LoRA,
    Module,
    PrefixTuning,
    PromptTuning,
    SparseFT,
    registered_kinds,
)
from polymod.routing import (
    Arrow,
    AttentionFusion,
    ExampleRouter,
    HashRouter,
    Polytropon,
    Retrieval,
    SoftmaxGate,
    SpanRouter,
    Static,
    TaskRouter,
    TopK,
)
from polymod.sites import Site, SiteSelector, select
from polymod.swarm import Remote
from polymod.training import Task, TrainConfig, Trainer
from polymod.training.lt_sft import lt_sft

__version__ = "0.1.0"

# Formats and package kinds that the core's module I/O reads register with it here, in one place
# (polymod.format never imports the layers above it).
for _loader in interop.LOADERS:
    format.register_loader(_loader)
format.register_package_kind("composition", load_composition)
# Remote parts (the swarm, an outer layer) mix through their own batched mixer: one call per expert.
register_mixer(swarm.RemotePart, swarm.remote_mixer)

__all__ = [
    "Adapter",
    "Arrow",
    "AttachReport",
    "AttentionFusion",
    "Card",
    "cluster",
    "Clustering",
    "CompositionError",
    "ConfigError",
    "Delta",
    "ExampleRouter",
    "few_shot_loss",
    "FormatError",
    "from_pretrained",
    "gen_know_sub",
    "HashRouter",
    "Head",
    "HostMismatchWarning",
    "hub",
    "HubError",
    "HyperLoRA",
    "IA3",
    "InactiveModuleWarning",
    "IncompatibleHostError",
    "Invertible",
    "Lineage",
    "load",
    "load_all",
    "LoRA",
    "lorahub",
    "lt_sft",
    "merge",
    "merge_checkpoints",
    "Mix",
    "Modular",
    "Module",
    "Parallel",
    "Parent",
    "PolymodError",
    "Polytropon",
    "PrefixTuning",
    "PromptTuning",
    "read_adapters",
    "read_peft",
    "read_peft_modules",
    "registered_kinds",
    "Remote",
    "Retrieval",
    "save",
    "save_all",
    "select",
    "Site",
    "SiteNotFoundError",
    "SiteSelector",
    "SoftmaxGate",
    "SpanRouter",
    "SparseFT",
    "Stack",
    "swarm",
    "StateError",
    "Static",
    "Task",
    "task_vector",
    "TaskRouter",
    "TopK",
    "TrainConfig",
    "Trainer",
    "UnknownArgumentError",
    "UnknownModuleError",
    "write_peft",
]
