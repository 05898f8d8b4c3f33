"""keras_blpa: memory-efficient training with approximate (K-bit) activations.

Any route installs working native ops (see keras_blpa/backends/tensorflow/native_build.py):

* ``pip install .`` / ``-e .`` / an sdist / a Git URL (build isolation, no
  TensorFlow in the build environment): the package ships the C++/CUDA sources,
  and the op library is compiled at first use for the TensorFlow actually
  imported, into a per-user cache (once; needs g++).
* ``pip install --no-build-isolation .`` with TensorFlow installed: the library is
  compiled now, into the package, and stamped with the TensorFlow it was built for.
* No compiler: one warning at first use, then the pure-TensorFlow kernels.

Environment:
    KERAS_BLPA_NATIVE=0      do not compile at install time
    KERAS_BLPA_NATIVE=1      fail (instead of deferring to first use) if it cannot be built now
    KERAS_BLPA_CUDA, CUDA_HOME, CUDA_PATH, CXX: see keras_blpa/backends/tensorflow/native_build.py
"""

import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_native_build():
    """native_build.py, loaded by path (the package imports TensorFlow)."""
    path = os.path.join(ROOT, "keras_blpa", "backends", "tensorflow", "native_build.py")
    spec = importlib.util.spec_from_file_location("_keras_blpa_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native_build = _load_native_build()

# The example scripts' input pipelines (keras_blpa.datasets).
EXAMPLES = [
    "tensorflow-datasets>=4.9",
    # tensorflow-datasets 4.9 imports it to prepare datasets but does not declare it.
    "importlib_resources",
]


class BuildPyWithNativeOps(build_py):
    """Ships the native sources in the package and, where TensorFlow is importable, builds the ops."""

    def run(self):
        super().run()
        package_dir = os.path.join(ROOT if self.editable_mode else self.build_lib, "keras_blpa")
        if not self.editable_mode:  # a checkout finds its sources beside the package
            self._copy_sources(os.path.join(package_dir, native_build.PACKAGED_SOURCES))
        self._build_ops(os.path.join(package_dir, native_build.LIBRARY_NAME))

    def _copy_sources(self, target):
        for rel in native_build.library_files(ROOT):
            os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, rel), os.path.join(target, rel))

    def _build_ops(self, output):
        wanted = native_build.env_flag("KERAS_BLPA_NATIVE")
        if wanted is False:
            return
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            if wanted:
                raise RuntimeError(
                    "KERAS_BLPA_NATIVE=1 but TensorFlow is not importable at build time "
                    "(use `pip install --no-build-isolation`)"
                )
            print("keras_blpa: TensorFlow is not in the build environment; the native ops "
                  "will be compiled at first use for the TensorFlow you import.")
            return
        try:
            stamp = native_build.build(output, ROOT, log=print)
            print(f"keras_blpa: built {output} for TensorFlow {stamp['tensorflow']}")
        except native_build.BuildError as e:
            if wanted:
                raise
            print(f"WARNING: keras_blpa native ops not built now ({e}); they will be "
                  "compiled at first use, or the pure-TensorFlow kernels used.", file=sys.stderr)


class BinaryDistribution(setuptools.Distribution):
    """The wheel may hold a compiled library: tag it for this platform."""

    def has_ext_modules(self):
        return True


setuptools.setup(
    name="keras_blpa",
    version="0.1.0",
    description=(
        "Backprop with approximate activations (Chakrabarti & Moseley, NeurIPS 2019) "
        "for Keras 3 (TensorFlow and JAX backends)"
    ),
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_blpa", "keras_blpa.*"]),
    python_requires=">=3.10",
    # The backend is the user's choice, as with keras-hub: one extra each.
    install_requires=["keras>=3.10", "numpy"],
    extras_require={
        "tensorflow": ["tensorflow>=2.18"],  # the full wheel (CUDA builds)
        "tensorflow-cpu": ["tensorflow-cpu>=2.18"],
        "jax": ["jax"],
        "examples": EXAMPLES,
        "benchmark": ["matplotlib"],
        "test": ["pytest", "hypothesis", "matplotlib", *EXAMPLES],
    },
    entry_points={
        "console_scripts": ["keras-blpa-benchmark=keras_blpa.benchmark.__main__:main"],
    },
    cmdclass={"build_py": BuildPyWithNativeOps},
    distclass=BinaryDistribution,
    zip_safe=False,
)
