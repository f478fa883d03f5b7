"""2:4 structured sparsity: masks, TensorRT eligibility and verification (modules and ONNX)."""

from qatsparse.sparsity.check import (
    PRUNED_METADATA_KEY,
    Violation,
    check_2to4,
    pruned_layers_from_metadata,
    sparsity_summary,
)
from qatsparse.sparsity.eligibility import Eligibility, find_prunable, shape_reason
from qatsparse.sparsity.masks import PRUNABLE_TYPES, apply_masks, compute_2to4_mask, is_2to4
from qatsparse.sparsity.prune import MaskSet, prune_2to4

__all__ = [
    "PRUNABLE_TYPES",
    "PRUNED_METADATA_KEY",
    "Eligibility",
    "MaskSet",
    "Violation",
    "apply_masks",
    "check_2to4",
    "compute_2to4_mask",
    "find_prunable",
    "is_2to4",
    "prune_2to4",
    "pruned_layers_from_metadata",
    "shape_reason",
    "sparsity_summary",
]
