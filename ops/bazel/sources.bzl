"""The ONE list of native sources, read by Bazel (BUILD) and by setup.py.

Plain assignments of string lists only: setup.py reads this file with Python's
ast module, and tests/test_native.py checks that these lists name exactly the
sources in cc/ and ops/.
"""

# Compiled by the host C++ compiler into the op library.
OP_SOURCES = [
    "ops/blpa_ops.cc",
    "ops/blpa_pool_ops.cc",
]

# Headers the op library and the CUDA object include.
HEADERS = [
    "cc/blpa_activations.h",
    "cc/blpa_bins.h",
    "cc/blpa_cpu.h",
    "cc/blpa_pool.h",
    "cc/blpa_quant_cuda.h",
]

# Compiled by nvcc (split design: no TensorFlow headers) and linked into the
# op library with the static CUDA runtime.
CUDA_SOURCES = [
    "cc/blpa_quant_cuda.cu",
]

# Standalone test/benchmark of cc/ (not part of the op library).
STANDALONE_SOURCES = [
    "cc/blpa_quant_test.cc",
]

# Host compiler flags beyond TensorFlow's own (tf.sysconfig): no FMA
# contraction, so y = x * scale + offset rounds exactly like TF's separate
# Mul and Add; -fno-trapping-math lets the selects vectorise (values unchanged).
# TensorFlow wheels themselves require AVX.
HOST_COPTS = [
    "-O3",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-mavx",
]

# nvcc flags: the same rounding rules on the device (and __f*_rn in the code).
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-fmad=false",
    "-Xcompiler",
    "-fPIC",
]

# GPU targets: SASS for Turing through Blackwell, PTX of sm_90 for the rest.
CUDA_GENCODE = [
    "-gencode=arch=compute_75,code=sm_75",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_86,code=sm_86",
    "-gencode=arch=compute_89,code=sm_89",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_100,code=sm_100",
    "-gencode=arch=compute_120,code=sm_120",
    "-gencode=arch=compute_90,code=compute_90",
]

# Static CUDA runtime: the library still loads where no driver exists.
CUDA_LINKOPTS = [
    "-l:libcudart_static.a",
    "-ldl",
    "-lrt",
    "-lpthread",
]
