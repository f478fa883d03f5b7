"""Calibration reads its own pass over the training data without disturbing the training loop's."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader, TensorDataset

from qatsparse.callbacks._common import _separate_pass
from qatsparse.report import json_safe


def test_calibration_pass_does_not_reset_a_persistent_worker_iterator():
    loader = DataLoader(TensorDataset(torch.arange(16).float()), batch_size=2, num_workers=1, persistent_workers=True)
    training = iter(loader)
    seen = [next(training)[0].tolist() for _ in range(3)]
    calibration = [b[0].tolist() for b, _ in zip(_separate_pass(loader), range(2))]
    rest = [b[0].tolist() for b in training]
    assert seen == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert calibration == [[0.0, 1.0], [2.0, 3.0]]
    assert rest[0] == [6.0, 7.0], "the training pass must continue where it was, not restart"
    assert len(rest) == 5


def test_plain_loaders_are_used_as_they_are():
    loader = DataLoader(TensorDataset(torch.arange(4).float()), batch_size=2)
    assert _separate_pass(loader) is loader


def test_report_json_is_strict_json_with_non_finite_values():
    text = json.dumps(json_safe({"fp16_overflow": {"conv": float("inf")}, "x": [float("nan"), 1.0]}), allow_nan=False)
    assert json.loads(text) == {"fp16_overflow": {"conv": "inf"}, "x": ["nan", 1.0]}
