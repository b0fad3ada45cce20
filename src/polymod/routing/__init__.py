"""Routing functions (survey §4): which modules act on an input, with what weight.

One file per router, each registering itself for composition JSON:
:mod:`~polymod.routing.fixed` (Static, TaskRouter, ExampleRouter, SpanRouter),
:mod:`~polymod.routing.softmax` (SoftmaxGate), :mod:`~polymod.routing.polytropon`
(Polytropon / MHR), :mod:`~polymod.routing.topk` (TopK), :mod:`~polymod.routing.hash`
(HashRouter), :mod:`~polymod.routing.attention` (AttentionFusion); library routers that need
no routing data: :mod:`~polymod.routing.arrow` (Arrow), :mod:`~polymod.routing.retrieval` (Retrieval),
:mod:`~polymod.routing.phatgoose` (Phatgoose, PhatgooseGate).
"""

from polymod.routing.arrow import Arrow, arrow_prototypes
from polymod.routing.attention import AttentionFusion
from polymod.routing.base import Router, RouterStats, register_router, registered_routers, router_from_json
from polymod.routing.fixed import ExampleRouter, SpanRouter, Static, TaskRouter
from polymod.routing.groups import RowGroups
from polymod.routing.hash import HashRouter
from polymod.routing.phatgoose import Phatgoose, PhatgooseGate
from polymod.routing.polytropon import Polytropon
from polymod.routing.retrieval import Retrieval, SentenceEncoder, centroid
from polymod.routing.softmax import SoftmaxGate
from polymod.routing.topk import TopK

__all__ = [
    "Arrow",
    "AttentionFusion",
    "ExampleRouter",
    "HashRouter",
    "Phatgoose",
    "PhatgooseGate",
    "Polytropon",
    "Retrieval",
    "Router",
    "RouterStats",
    "RowGroups",
    "SentenceEncoder",
    "SoftmaxGate",
    "SpanRouter",
    "Static",
    "TaskRouter",
    "TopK",
    "arrow_prototypes",
    "centroid",
    "register_router",
    "registered_routers",
    "router_from_json",
]
