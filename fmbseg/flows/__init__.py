"""Prefect flows: compose stage tasks; no model code here.

``annotate-and-train`` is what the deployments in ``prefect.yaml`` run; ``retrain`` is the
scheduled incremental one.
"""

from fmbseg.flows.annotate import annotate_flow
from fmbseg.flows.annotate_and_train import annotate_and_train_flow
from fmbseg.flows.evaluate import compare_teachers_flow, evaluate_flow, label_quality_flow
from fmbseg.flows.index import index_flow
from fmbseg.flows.retrain import retrain_flow
from fmbseg.flows.train import train_flow

__all__ = [
    "annotate_and_train_flow",
    "annotate_flow",
    "compare_teachers_flow",
    "evaluate_flow",
    "index_flow",
    "label_quality_flow",
    "retrain_flow",
    "train_flow",
]
