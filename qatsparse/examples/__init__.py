"""Datamodules and models that the shipped recipes use."""

from qatsparse.examples.digits import DigitsDataModule, EpochSeededSampler
from qatsparse.examples.models import BasicBlock, ResidualCNN

__all__ = ["BasicBlock", "DigitsDataModule", "EpochSeededSampler", "ResidualCNN"]
