"""CIFAR-100 with the paper's setup: pre-activation bottleneck ResNet-164, batch 128,
64k steps, SGD momentum 0.9, weight decay 2e-4, random 4 px translations and flips.

    python examples/cifar100.py --bits 4 [--data_dir DIR | --manual_dir DIR | --download]

All flags: see examples/train.py (python examples/cifar100.py --help).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402


def main(argv=None):
    return train.main(argv, dataset="cifar100")


if __name__ == "__main__":
    train.cli("cifar100")
