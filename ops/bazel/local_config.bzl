"""Repository rule exposing the installed TensorFlow (and a CUDA toolkit) to Bazel.

Asks the Python interpreter (PYTHON_BIN_PATH, else python3 on PATH) for
tf.sysconfig's include dir, library dir and compile flags, and symlinks them
into the repository, which then provides

  :tf_headers     cc_library of TensorFlow's headers, with TensorFlow's own
                  defines (the C++ ABI flag and Eigen alignment, read from
                  tf.sysconfig.get_compile_flags(), never hard-coded);
  :tf_framework   libtensorflow_framework.so.2;
  :cudart_static  the static CUDA runtime (when a toolkit was found);
  :config.bzl     HAS_CUDA, and NVCC (the nvcc path) for the genrule.

CUDA is used as keras_blpa/backends/tensorflow/native_build.py decides for every build route: when
TensorFlow is a CUDA build and an nvcc of its CUDA major version (CUDA_HOME /
CUDA_PATH, PATH, /usr/local/cuda) is found with libcudart_static.a, unless
KERAS_BLPA_CUDA=0.
"""

_PY = """
import json, tensorflow as tf
print(json.dumps({
    "include": tf.sysconfig.get_include(),
    "lib": tf.sysconfig.get_lib(),
    "cflags": tf.sysconfig.get_compile_flags(),
    "lflags": tf.sysconfig.get_link_flags(),
}))
"""

def _python(ctx):
    path = ctx.os.environ.get("PYTHON_BIN_PATH")
    if path:
        return path
    for name in ["python3", "python"]:
        found = ctx.which(name)
        if found:
            return str(found)
    fail("keras_blpa: no Python interpreter found (set PYTHON_BIN_PATH)")

def _find_cuda(ctx, python):
    # The one CUDA discovery of the project (keras_blpa/backends/tensorflow/native_build.py, also used
    # by setup.py and at first use): CUDA kernels only for a CUDA build of
    # TensorFlow, with an nvcc of the same CUDA major version.
    script = ctx.path(Label("//:setup.py")).dirname.get_child("keras_blpa").get_child("backends").get_child("tensorflow").get_child("native_build.py")
    res = ctx.execute([python, str(script), "cuda"], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"})
    if res.return_code != 0:
        fail("keras_blpa: CUDA discovery failed:\n%s" % res.stderr)
    plan = json.decode(res.stdout.strip().splitlines()[-1])
    print("keras_blpa: " + plan["reason"])
    toolkit = plan["toolkit"]
    if not toolkit:
        return None
    return struct(nvcc = toolkit["nvcc"], lib = toolkit["lib_dir"])

def _local_config_impl(ctx):
    python = _python(ctx)
    res = ctx.execute([python, "-c", _PY], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"})
    if res.return_code != 0:
        fail("keras_blpa: cannot import TensorFlow with %s:\n%s" % (python, res.stderr))
    info = json.decode(res.stdout.strip().splitlines()[-1])
    ctx.symlink(info["include"], "include")
    ctx.symlink(info["lib"] + "/libtensorflow_framework.so.2", "lib/libtensorflow_framework.so.2")
    defines = []
    for flag in info["cflags"]:
        if flag.startswith("-D"):
            defines.append(flag[2:])
    cuda = _find_cuda(ctx, python)
    build = [
        "package(default_visibility = [\"//visibility:public\"])",
        "",
        "cc_library(",
        "    name = \"tf_headers\",",
        "    hdrs = glob([\"include/**/*.h\", \"include/**/*.inc\", \"include/**/*.hpp\",",
        "                 \"include/Eigen/**\", \"include/unsupported/Eigen/**\",",
        "                 \"include/third_party/eigen3/**\"]),",
        "    includes = [\"include\"],",
        "    defines = %s," % repr(defines),
        ")",
        "",
        "cc_library(",
        "    name = \"tf_framework\",",
        "    srcs = [\"lib/libtensorflow_framework.so.2\"],",
        ")",
        "",
    ]
    if cuda:
        ctx.symlink(cuda.lib + "/libcudart_static.a", "cuda/libcudart_static.a")
        build += [
            "cc_library(",
            "    name = \"cudart_static\",",
            "    srcs = [\"cuda/libcudart_static.a\"],",
            "    linkopts = [\"-ldl\", \"-lrt\", \"-lpthread\"],",
            ")",
            "",
        ]
    ctx.file("BUILD", "\n".join(build))
    ctx.file("config.bzl", "HAS_CUDA = %s\nNVCC = %s\nPYTHON = %s\n" % (
        "True" if cuda else "False",
        repr(cuda.nvcc if cuda else ""),
        repr(python),
    ))

local_config = repository_rule(
    implementation = _local_config_impl,
    environ = ["PYTHON_BIN_PATH", "KERAS_BLPA_CUDA", "CUDA_HOME", "CUDA_PATH", "PATH"],
    local = True,
)
