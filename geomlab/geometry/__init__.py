"""Spatial Disorder, retrieval and forgetting measures as plain functions over tensors.

    from geomlab.geometry import rotation_angles, procrustes, spatial_disorder
    theta = rotation_angles(image_a, image_b)          # degrees, per sample
    p = procrustes(image_a, image_b)                   # rotation, spectrum, rigid_share, residual_angles
"""
from .forgetting import (accuracy_matrix, average_accuracy, bwt, continual_metrics, forgetting, last_accuracy,
                         learned_at, transfer)
from .measures import (DISORDER_SCALARS, ProcrustesResult, disorder_scalars, disorder_scalars_series, eigen_angles, flips, inter_modal_deviation, linear_cka,
                       modality_gap, mutual_knn, procrustes, roc_auc, rotation_angles, spatial_disorder,
                       topology_drift)
from .precedence import forecast_errors, lead_lag
from .realign import (cross_linear_map, cross_orthogonal_map, modality_orthogonal_maps, realigned_r1,
                      realignment, recovered_share)
from .retrieval import metrics_from_ranks, retrieval_metrics
from .stats import summarize

__all__ = [
    "rotation_angles", "topology_drift", "procrustes", "ProcrustesResult", "eigen_angles", "linear_cka",
    "mutual_knn", "modality_gap", "inter_modal_deviation", "flips", "spatial_disorder", "disorder_scalars", "disorder_scalars_series", "DISORDER_SCALARS",
    "retrieval_metrics", "metrics_from_ranks", "accuracy_matrix", "average_accuracy", "forgetting", "bwt",
    "last_accuracy", "transfer", "learned_at", "continual_metrics",
    "summarize", "roc_auc",
    "realignment", "realigned_r1", "recovered_share", "cross_orthogonal_map", "modality_orthogonal_maps",
    "cross_linear_map", "lead_lag", "forecast_errors",
]
