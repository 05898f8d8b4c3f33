"""keras_blpa: memory-efficient training with approximate (K-bit) activations."""

import importlib.metadata

import setuptools


def tensorflow_requirement():
    """`tensorflow` if the full (GPU) wheel is installed, else `tensorflow-cpu`."""
    try:
        importlib.metadata.version("tensorflow")
        return "tensorflow>=2.18"
    except importlib.metadata.PackageNotFoundError:
        return "tensorflow-cpu>=2.18"


setuptools.setup(
    name="keras_blpa",
    version="0.1.0",
    description=(
        "Backprop with approximate activations (Chakrabarti & Moseley, NeurIPS 2019) "
        "for Keras 3 / TensorFlow"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_blpa", "keras_blpa.*"]),
    python_requires=">=3.10",
    install_requires=[
        tensorflow_requirement(),
        "keras>=3.10",
        "numpy",
        "tensorflow-datasets>=4.9",
        "importlib_resources",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
    },
    entry_points={
        "console_scripts": ["keras-blpa-benchmark=keras_blpa.benchmark.__main__:main"],
    },
)
