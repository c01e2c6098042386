"""Prefect flows: compose stage tasks; no model code here.

``annotate-and-train`` is what the deployments in ``prefect.yaml`` run; ``retrain`` is the
scheduled incremental one.
"""

from fmbseg.flows.annotate import AnnotateResult, AnnotationSummary, annotate_flow
from fmbseg.flows.annotate_and_train import (
    AnnotateAndTrainResult,
    Promotion,
    Score,
    annotate_and_train_flow,
)
from fmbseg.flows.evaluate import (
    EvaluationReport,
    LabelQualityReport,
    TeacherComparison,
    TeacherRow,
    compare_teachers_flow,
    evaluate_flow,
    label_quality_flow,
)
from fmbseg.flows.index import index_flow
from fmbseg.flows.retrain import RetrainResult, retrain_flow
from fmbseg.flows.train import TrainedModel, TrainResult, train_flow

__all__ = [
    "AnnotateAndTrainResult",
    "AnnotateResult",
    "AnnotationSummary",
    "EvaluationReport",
    "LabelQualityReport",
    "Promotion",
    "RetrainResult",
    "Score",
    "TeacherComparison",
    "TeacherRow",
    "TrainResult",
    "TrainedModel",
    "annotate_and_train_flow",
    "annotate_flow",
    "compare_teachers_flow",
    "evaluate_flow",
    "index_flow",
    "label_quality_flow",
    "retrain_flow",
    "train_flow",
]
