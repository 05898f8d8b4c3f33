"""ImageNet (ILSVRC 2012) with a ResNet-152-style network and 10-crop evaluation
at scale 256. TFDS prepares the data from the original tar files in --manual_dir.

    python examples/imagenet2012.py --manual_dir ~/imagenet --bits 4 --strategy mirrored

All flags: see examples/train.py (python examples/imagenet2012.py --help).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402


def main(argv=None):
    return train.main(argv, dataset="imagenet2012")


if __name__ == "__main__":
    train.cli("imagenet2012")
