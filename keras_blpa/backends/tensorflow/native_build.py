"""Builds the native op library for the TensorFlow in use, once per user, like a kernel cache.

One implementation for both routes: setup.py calls `build()` at install time when
TensorFlow is importable there, and `native` calls `cached_library()` at
first use otherwise (a plain ``pip install .`` builds in an isolated environment
without TensorFlow). The cache entry is keyed by everything the binary depends on:
the TensorFlow version and its compile/link flags (C++ ABI), the CUDA plan, the
source files' contents, the compiler and the machine. A library built for another
TensorFlow is never loaded. Parallel processes (multi-worker training, benchmark
trials, pytest) take a file lock, so one builds and the others wait for it; a valid
entry is used without the lock, so a read-only cache works.

The library and its stamp are each written to a temporary file beside them,
fsynced and renamed, and the stamp records the library's size and sha256: an
entry that does not match them (a file truncated or zeroed by a crash) is
rebuilt, never loaded, since mapping a truncated library kills the process with
SIGBUS. A failed compile is recorded in the entry's ``build-error.txt`` and not
retried until that file is deleted; a compiler killed by a signal (e.g. out of
memory) is not a compile error and is retried at the next use.

The CPU kernels are compiled for AVX, AVX2 and AVX-512 in the same binary and the
best level the CPU supports is chosen at run time (``KERAS_BLPA_CPU_ISA=avx|avx2``,
any case, caps it), so one cache entry serves every x86-64 CPU.

CUDA kernels are built only when the installed TensorFlow is a CUDA build and an
nvcc of the same CUDA major version is found: the library then links that
toolkit's static runtime and needs no newer driver than TensorFlow itself.

This module imports nothing from keras_blpa and TensorFlow only inside functions,
so that setup.py can load it by path.

Environment:
    KERAS_BLPA_CACHE      cache folder (default $XDG_CACHE_HOME/keras_blpa or ~/.cache/keras_blpa)
    KERAS_BLPA_CUDA       0: never build CUDA kernels; 1: fail unless they can be built
    CUDA_HOME, CUDA_PATH  CUDA toolkit root (default: from nvcc on PATH, /usr/local/cuda)
    CXX                   host compiler (default g++)
"""

import ast
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

__all__ = [
    "BuildError",
    "LIBRARY_NAME",
    "build",
    "cache_dir",
    "cached_library",
    "cuda_plan",
    "find_cuda",
    "library_problem",
    "read_stamp",
    "source_root",
    "sources",
    "tensorflow_info",
]

LIBRARY_NAME = "_blpa_ops.so"
SOURCES_FILE = os.path.join("ops", "bazel", "sources.bzl")
# Where setup.py puts a copy of the sources inside an installed package.
PACKAGED_SOURCES = "_native_src"
# keras_blpa/ (this file is keras_blpa/backends/tensorflow/native_build.py).
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_log = logging.getLogger("keras_blpa")


class BuildError(RuntimeError):
    """The op library cannot be built here; the message says what is missing."""


class _CompilerKilled(BuildError):
    """The compiler was killed by a signal (e.g. out of memory): not the sources' fault."""


# What gcc's driver prints (exit 1) when cc1plus, not the driver, gets SIGKILL.
_GCC_KILLED = "Killed signal terminated program"


def env_flag(name):
    """True / False for 1/true/yes/on and 0/false/no/off, None if unset or other."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def source_root():
    """The folder holding ops/ and cc/: the installed copy or the source checkout."""
    for root in (os.path.join(PACKAGE_DIR, PACKAGED_SOURCES), os.path.dirname(PACKAGE_DIR)):
        if os.path.exists(os.path.join(root, SOURCES_FILE)):
            return root
    return None


def sources(root=None):
    """The lists of ops/bazel/sources.bzl (the one list Bazel's BUILD uses too)."""
    root = root or source_root()
    if root is None:
        raise BuildError("the native sources (ops/, cc/) are not installed with keras_blpa")
    path = os.path.join(root, SOURCES_FILE)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1
    }


def library_files(root=None):
    """Relative paths of the files the op library is built from."""
    src = sources(root)
    return [SOURCES_FILE] + src["OP_SOURCES"] + src["HEADERS"] + src["CUDA_SOURCES"]


def tensorflow_info():
    """What the library must match: TensorFlow's version, flags and CUDA build."""
    import tensorflow as tf

    build_info = tf.sysconfig.get_build_info()
    return {
        "version": tf.__version__,
        "cflags": list(tf.sysconfig.get_compile_flags()),
        "lflags": list(tf.sysconfig.get_link_flags()),
        "cuda_version": build_info.get("cuda_version") if build_info.get("is_cuda_build") else None,
    }


def _nvcc_version(nvcc):
    try:
        out = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def find_cuda():
    """{nvcc, lib_dir, version} of a CUDA toolkit with a static runtime, or None.

    Looks at CUDA_HOME, CUDA_PATH, the toolkit of nvcc on PATH, /usr/local/cuda.
    """
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.exists(nvcc):
            continue
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            lib_dir = os.path.join(home, lib)
            if os.path.exists(os.path.join(lib_dir, "libcudart_static.a")):
                return {"nvcc": nvcc, "lib_dir": lib_dir, "version": _nvcc_version(nvcc)}
    return None


def cuda_plan(tf_info):
    """(toolkit or None, reason): whether and with which nvcc to build the CUDA kernels."""
    if env_flag("KERAS_BLPA_CUDA") is False:
        return None, "CUDA kernels not built: KERAS_BLPA_CUDA=0"
    wanted = tf_info["cuda_version"]
    if not wanted:
        return None, (
            f"CUDA kernels not built: TensorFlow {tf_info['version']} is not a CUDA build "
            "(tensorflow-cpu); install `tensorflow` (with CUDA) for the GPU kernels"
        )
    toolkit = find_cuda()
    if toolkit is None:
        return None, (
            f"CUDA kernels not built: TensorFlow was built with CUDA {wanted}, but no CUDA "
            "toolkit (nvcc and libcudart_static.a) was found; set CUDA_HOME to a CUDA "
            f"{wanted.split('.')[0]}.x toolkit"
        )
    have = toolkit["version"] or "unknown"
    if have.split(".")[0] != str(wanted).split(".")[0]:
        return None, (
            f"CUDA kernels not built: TensorFlow was built with CUDA {wanted}, but "
            f"{toolkit['nvcc']} is CUDA {have}; set CUDA_HOME to a CUDA "
            f"{str(wanted).split('.')[0]}.x toolkit"
        )
    return toolkit, f"CUDA kernels built with {toolkit['nvcc']} (CUDA {have})"


def _compiler():
    return shlex.split(os.environ.get("CXX", "g++"))


def _compiler_version(cxx):
    try:
        return subprocess.run(
            [*cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def build_key(root, tf_info, toolkit):
    """Hash of everything the binary depends on (see the module docstring)."""
    digest = hashlib.sha256()
    for rel in library_files(root):
        digest.update(rel.encode())
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    meta = {
        "tensorflow": tf_info,
        "cuda": toolkit and toolkit["version"],
        "compiler": _compiler_version(_compiler()),
        "machine": platform.machine(),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def stamp_path(library):
    """The JSON file beside a library that says what it was built for."""
    return os.path.splitext(library)[0] + ".json"


def read_stamp(library):
    """The stamp of a library, or None if it has none (e.g. a Bazel build)."""
    try:
        with open(stamp_path(library), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _elf_problem(library):
    """Why the dynamic loader would fault on `library` (an ELF64 file cut short), or None.

    Files that are not ELF64 are left to the loader, which rejects them with an error.
    """
    with open(library, "rb") as f:
        data = f.read()
    if data[:5] != b"\x7fELF\x02":
        return None
    order = "<" if data[5:6] == b"\x01" else ">"
    try:
        (phoff,) = struct.unpack_from(order + "Q", data, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 54)
        headers = [struct.unpack_from(order + "IIQQQQ", data, phoff + i * phentsize)
                   for i in range(phnum)]
    except struct.error:
        return f"truncated: {len(data)} bytes, its program headers are cut off"
    end = max((h[2] + h[5] for h in headers if h[0] == 1), default=0)  # PT_LOAD offset + size
    if end > len(data):
        return f"truncated: {len(data)} bytes, its segments end at byte {end}"
    return None


def library_problem(library):
    """Why `library` must not be loaded, or None.

    A library whose stamp records a size and sha256 must match them. One without
    (a Bazel build, an older stamp) must hold every segment the dynamic loader maps:
    mapping past the end of a truncated file kills the process with SIGBUS.
    """
    stamp = read_stamp(library) or {}
    if "sha256" not in stamp:
        return _elf_problem(library)
    size = os.path.getsize(library)
    if size != stamp["size"]:
        return f"truncated or altered: {size} bytes, its stamp records {stamp['size']}"
    if _sha256(library) != stamp["sha256"]:
        return "altered: its sha256 is not the one its stamp records"
    return None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path):
    """A temporary path beside `path`; what is written there is fsynced and renamed to `path`."""
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        yield partial
        _fsync(partial)
        os.replace(partial, path)
        _fsync(os.path.dirname(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _run(cmd, cwd, log):
    log(" ".join(shlex.quote(c) for c in cmd))
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    output = (result.stderr or result.stdout)[-4000:]
    name = os.path.basename(cmd[0])
    if result.returncode < 0 or _GCC_KILLED in output:
        how = (f"signal {-result.returncode} ({signal.strsignal(-result.returncode)})"
               if result.returncode < 0 else "SIGKILL")
        raise _CompilerKilled(
            f"`{name}` was killed by {how}, e.g. out of memory: not a compile error, "
            f"so the next use compiles again:\n{output}"
        )
    if result.returncode:
        raise BuildError(f"`{name}` failed (exit {result.returncode}):\n{output}")


def build(output, root=None, tf_info=None, log=None):
    """Compiles the op library to `output` and writes its stamp; returns the stamp.

    Raises:
        BuildError: no compiler, no sources, or a failed compile (with its output).
    """
    log = log or _log.info
    root = root or source_root()
    src = sources(root)
    tf_info = tf_info or tensorflow_info()
    cxx = _compiler()
    if shutil.which(cxx[0]) is None:
        raise BuildError(f"no C++ compiler: `{cxx[0]}` not found (set CXX or install g++)")
    toolkit, cuda_reason = cuda_plan(tf_info)
    if toolkit is None and env_flag("KERAS_BLPA_CUDA") is True:
        raise BuildError(f"KERAS_BLPA_CUDA=1 but {cuda_reason}")
    log(cuda_reason)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        objects, defines, cuda_link = [], [], []
        if toolkit is not None:
            for source in src["CUDA_SOURCES"]:
                obj = os.path.join(tmp, os.path.basename(source) + ".o")
                _run([toolkit["nvcc"], "-c", *src["NVCC_FLAGS"], *src["CUDA_GENCODE"],
                      "-I", root, source, "-o", obj], root, log)
                objects.append(obj)
            defines = ["-DGOOGLE_CUDA=1"]
            cuda_link = ["-L" + toolkit["lib_dir"], *src["CUDA_LINKOPTS"]]
        copts = src["HOST_COPTS"]
        if platform.machine().lower() not in ("x86_64", "amd64"):
            copts = [c for c in copts if not c.startswith("-mavx")]
        # Library first, then its stamp, each complete on disk before its rename.
        with _replacing(output) as partial:
            _run([*cxx, "-shared", "-fPIC", *copts, "-w", *defines, "-I", root,
                  *tf_info["cflags"], *src["OP_SOURCES"], *objects, "-o", partial,
                  *tf_info["lflags"], *cuda_link], root, log)
            size, sha256 = os.path.getsize(partial), _sha256(partial)
    stamp = {
        "key": build_key(root, tf_info, toolkit),
        "tensorflow": tf_info["version"],
        "cuda": toolkit and toolkit["version"],
        "cuda_reason": cuda_reason,
        "size": size,
        "sha256": sha256,
    }
    with _replacing(stamp_path(output)) as partial, open(partial, "w", encoding="utf-8") as f:
        json.dump(stamp, f, indent=1)
    return stamp


def cache_dir():
    """The per-user cache folder of built libraries."""
    path = os.environ.get("KERAS_BLPA_CACHE")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "keras_blpa")
    return path


@contextlib.contextmanager
def _file_lock(path):
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def matches(library, tf_info, root=None):
    """Whether `library`'s stamp says it was built from these sources for this TensorFlow."""
    stamp = read_stamp(library)
    if stamp is None or not os.path.exists(library):
        return False
    root = root or source_root()
    if root is None:  # no sources to hash: the TensorFlow version must still match
        return stamp.get("tensorflow") == tf_info["version"]
    toolkit, _ = cuda_plan(tf_info)
    return stamp.get("key") == build_key(root, tf_info, toolkit)


def _build_reason(library):
    """Why the cache entry must be built, for the compile message; None if it can be loaded."""
    stamp = read_stamp(library)
    if stamp is None or not os.path.exists(library):
        return "first use only"
    if "sha256" not in stamp:
        return "rebuilding: the stamp, from an older keras_blpa, has no sha256 to check"
    problem = library_problem(library)
    return problem and f"rebuilding: the cached library is {problem}"


def cached_library(tf_info=None, log=None):
    """Path of a library built for this TensorFlow, building it (once, locked) if needed."""
    root = source_root()
    if root is None:
        raise BuildError("the native sources (ops/, cc/) are not installed with keras_blpa")
    tf_info = tf_info or tensorflow_info()
    toolkit, _ = cuda_plan(tf_info)
    key = build_key(root, tf_info, toolkit)
    folder = os.path.join(cache_dir(), f"ops-{key}")
    library = os.path.join(folder, LIBRARY_NAME)
    failure = os.path.join(folder, "build-error.txt")
    if _build_reason(library) is None:  # no lock needed: a read-only cache works
        return library
    os.makedirs(folder, exist_ok=True)
    with _file_lock(os.path.join(folder, "build.lock")):
        reason = _build_reason(library)  # None if another process built it meanwhile
        if reason is not None:
            if os.path.exists(failure):  # the same build failed before: do not retry each time
                with open(failure, encoding="utf-8") as f:
                    raise BuildError(f"{f.read()}\n(delete {failure} to try again)")
            (log or _log.warning)(
                f"keras_blpa: compiling the native ops for TensorFlow {tf_info['version']} "
                f"into {folder} ({reason})"
            )
            try:
                build(library, root, tf_info, log=_log.info)
            except _CompilerKilled:
                raise  # not the sources' fault: try again next time
            except BuildError as e:
                if shutil.which(_compiler()[0]) is None:
                    raise  # cheap to find out again, and fixed by installing one
                with open(failure, "w", encoding="utf-8") as f:
                    f.write(str(e))
                raise
    return library


def _main(argv):
    """CLI: `cuda` prints the CUDA toolkit as JSON (for Bazel); `build OUT` builds one."""
    if argv[:1] == ["cuda"]:
        plan, reason = cuda_plan(tensorflow_info())
        print(json.dumps({"toolkit": plan, "reason": reason}))
    elif argv[:1] == ["build"] and len(argv) == 2:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(json.dumps(build(argv[1])))
    else:
        print("usage: python -m keras_blpa.backends.tensorflow.native_build cuda | build OUTPUT.so", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
