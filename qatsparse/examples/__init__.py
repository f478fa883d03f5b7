"""Datamodules and models that the shipped recipes use."""

from qatsparse.examples.cifar10 import CIFAR10DataModule
from qatsparse.examples.classifier import ImageClassifier, build_resnet
from qatsparse.examples.digits import DigitsDataModule, EpochSeededSampler
from qatsparse.examples.imagefolder import ImageFolderDataModule
from qatsparse.examples.models import BasicBlock, ResidualCNN
from qatsparse.examples.pretrained import load_init_ckpt, mark_restored, setup_init_ckpt
from qatsparse.examples.transformer import DigitsTransformer
from qatsparse.examples.two_head import TwoHeadDataModule, TwoHeadNet, generate_positions

__all__ = [
    "BasicBlock",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "DigitsTransformer",
    "EpochSeededSampler",
    "ImageClassifier",
    "ImageFolderDataModule",
    "ResidualCNN",
    "TwoHeadDataModule",
    "TwoHeadNet",
    "build_resnet",
    "generate_positions",
    "load_init_ckpt",
    "mark_restored",
    "setup_init_ckpt",
]
