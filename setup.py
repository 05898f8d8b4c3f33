"""keras_blpa: memory-efficient training with approximate (K-bit) activations.

Besides the Python package, this builds the native op library
``keras_blpa/_blpa_ops.so`` from the sources listed in ops/bazel/sources.bzl (the
list Bazel's BUILD uses too), with g++ and TensorFlow's own flags
(tf.sysconfig), plus nvcc for the CUDA kernels when a CUDA toolkit is on PATH.
TensorFlow must be importable at build time, so install with
``pip install --no-build-isolation .`` (or ``-e .``). Without TensorFlow or a
compiler the package still installs and uses the pure-TF kernels.

Environment:
    KERAS_BLPA_CUDA=0        build without CUDA even if nvcc is found
    KERAS_BLPA_CUDA=1        fail if CUDA cannot be built
    KERAS_BLPA_NATIVE=0      skip the native library entirely
    KERAS_BLPA_NATIVE=1      fail (instead of warning) if it cannot be built
    CUDA_HOME / CUDA_PATH    CUDA toolkit root (default: found from nvcc)
    CXX                      host compiler (default g++)
"""

import ast
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys

import setuptools
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES_FILE = os.path.join("ops", "bazel", "sources.bzl")
LIBRARY = "keras_blpa._blpa_ops"


def tensorflow_requirement():
    """`tensorflow` if the full (GPU) wheel is installed, else `tensorflow-cpu`."""
    try:
        importlib.metadata.version("tensorflow")
        return "tensorflow>=2.18"
    except importlib.metadata.PackageNotFoundError:
        return "tensorflow-cpu>=2.18"


def native_sources():
    """The lists of ops/bazel/sources.bzl (shared with Bazel's BUILD)."""
    with open(os.path.join(ROOT, SOURCES_FILE), encoding="utf-8") as f:
        tree = ast.parse(f.read(), SOURCES_FILE)
    lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            lists[node.targets[0].id] = ast.literal_eval(node.value)
    return lists


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def find_cuda():
    """(nvcc, lib_dir) of a CUDA toolkit with a static runtime, or None."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        candidate = nvcc or os.path.join(home, "bin", "nvcc")
        if not os.path.exists(candidate):
            candidate = os.path.join(home, "bin", "nvcc")
        if not os.path.exists(candidate):
            continue
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            lib_dir = os.path.join(home, lib)
            if os.path.exists(os.path.join(lib_dir, "libcudart_static.a")):
                return candidate, lib_dir
    return None


class BuildNativeOps(build_ext):
    """Builds keras_blpa/_blpa_ops.so with g++ (+ nvcc) from tf.sysconfig flags."""

    def get_ext_filename(self, fullname):
        # distutils asks both with the full dotted name and with the last part.
        if fullname.split(".")[-1] == LIBRARY.split(".")[-1]:
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != LIBRARY:
            return super().build_extension(ext)
        required = _env_flag("KERAS_BLPA_NATIVE") is True
        try:
            self._build_ops(self.get_ext_fullpath(ext.name))
        except Exception as e:  # noqa: BLE001
            if required:
                raise
            sys.stderr.write(
                f"WARNING: keras_blpa native ops not built ({e}); the package "
                "will use the pure-TensorFlow kernels.\n"
            )

    def _run(self, cmd):
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.check_call(cmd, cwd=ROOT)

    def _build_ops(self, output):
        try:
            import tensorflow as tf
        except ImportError as e:
            raise RuntimeError(
                "TensorFlow is not importable at build time (use "
                "`pip install --no-build-isolation`)"
            ) from e
        src = native_sources()
        tf_cflags = tf.sysconfig.get_compile_flags()
        tf_lflags = tf.sysconfig.get_link_flags()
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = os.path.abspath(self.build_temp)
        os.makedirs(tmp, exist_ok=True)

        objects, defines, cuda_link = [], [], []
        want_cuda = _env_flag("KERAS_BLPA_CUDA")
        cuda = find_cuda() if want_cuda is not False else None
        if want_cuda is True and cuda is None:
            raise RuntimeError("KERAS_BLPA_CUDA=1 but no CUDA toolkit (nvcc + libcudart_static.a)")
        if cuda is not None:
            nvcc, lib_dir = cuda
            for source in src["CUDA_SOURCES"]:
                obj = os.path.join(tmp, os.path.basename(source) + ".o")
                self._run(
                    [nvcc, "-c", *src["NVCC_FLAGS"], *src["CUDA_GENCODE"], "-I", ROOT,
                     source, "-o", obj]
                )
                objects.append(obj)
            defines = ["-DGOOGLE_CUDA=1"]
            cuda_link = ["-L" + lib_dir, *src["CUDA_LINKOPTS"]]
        cxx = shlex.split(os.environ.get("CXX", "g++"))
        copts = src["HOST_COPTS"]
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
            copts = [c for c in copts if not c.startswith("-mavx")]
        self._run(
            [*cxx, "-shared", "-fPIC", *copts, "-w", *defines, "-I", ROOT,
             *tf_cflags, *src["OP_SOURCES"], *objects, "-o", output, *tf_lflags,
             *cuda_link]
        )


def native_extensions():
    if _env_flag("KERAS_BLPA_NATIVE") is False:
        return []
    src = native_sources()
    # Declared so that setuptools runs build_ext (also for editable installs);
    # BuildNativeOps does the compiling.
    return [
        setuptools.Extension(
            LIBRARY,
            sources=src["OP_SOURCES"],
            depends=src["HEADERS"] + src["CUDA_SOURCES"],
        )
    ]


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
    ext_modules=native_extensions(),
    cmdclass={"build_ext": BuildNativeOps},
    zip_safe=False,
)
