"""Fashion-MNIST, offline: TFDS when the data is prepared, else the IDX files of a
local copy (Debian's dataset-fashion-mnist package, ~/.keras/datasets/fashion-mnist
or --data_dir). --compare trains the exact (stock) and the K-bit model, then
measures one training step of each on a ResNet-56 built for the measurement: the
last line gives both test accuracies, both step memories above what is resident,
and how much larger a K-bit batch runs in the exact step's memory (measured).

    python examples/fashion_mnist.py --compare     # depth 11, batch 128, 200 steps

All flags: see examples/train.py (python examples/fashion_mnist.py --help).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402


def main(argv=None):
    return train.main(argv, dataset="fashion_mnist")


if __name__ == "__main__":
    train.cli("fashion_mnist")
