"""Prefect flows: compose stage tasks; no model code here."""

from fmbseg.flows.evaluate import evaluate_flow, label_quality_flow
from fmbseg.flows.index import index_flow
from fmbseg.flows.train import train_flow

__all__ = ["evaluate_flow", "index_flow", "label_quality_flow", "train_flow"]
