"""2:4 structured sparsity: prunable weights, masks, TensorRT eligibility and verification (modules and ONNX)."""

from qatsparse.sparsity.check import (
    PRUNED_METADATA_KEY,
    Violation,
    check_2to4,
    pruned_layers_from_metadata,
    sparsity_summary,
)
from qatsparse.sparsity.eligibility import Eligibility, find_prunable, shape_reason
from qatsparse.sparsity.masks import apply_masks, compute_2to4_mask, is_2to4, worst_group
from qatsparse.sparsity.prune import MaskSet, compute_masks, prune_2to4
from qatsparse.sparsity.record import pruned_record, set_pruned_record
from qatsparse.sparsity.summary import format_summary, sparsity_metrics
from qatsparse.sparsity.weights import PRUNABLE_TYPES, PrunableWeight, prunable_weights, resolve_weight, weight_key

__all__ = [
    "PRUNABLE_TYPES",
    "PRUNED_METADATA_KEY",
    "Eligibility",
    "MaskSet",
    "PrunableWeight",
    "Violation",
    "apply_masks",
    "check_2to4",
    "compute_2to4_mask",
    "compute_masks",
    "find_prunable",
    "format_summary",
    "is_2to4",
    "prunable_weights",
    "prune_2to4",
    "pruned_layers_from_metadata",
    "pruned_record",
    "resolve_weight",
    "set_pruned_record",
    "shape_reason",
    "sparsity_metrics",
    "sparsity_summary",
    "weight_key",
    "worst_group",
]
