"""cffi build script (API mode, out of line): compiles native/src into aiote._native.

libfabric is found with pkg-config, or under $LIBFABRIC_ROOT (e.g. the AWS EFA
installer's /opt/amazon/efa) when that is set.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ["engine.c", "fabric.c", "worker.c", "imm_table.c", "events.c", "local_peers.c", "wire.c", "discovery.c",
           "cuda_copy.c", "direct.c", "copy_assist.c", "moe.c", "carry.c"]


def _libfabric_flags() -> tuple[list[str], list[str], list[str]]:
    """Return (include_dirs, library_dirs, extra_link_args) for libfabric."""
    root = os.environ.get("LIBFABRIC_ROOT")
    if root:
        lib = next((p for p in (Path(root) / "lib64", Path(root) / "lib") if p.is_dir()), Path(root) / "lib")
        return [str(Path(root) / "include")], [str(lib)], [f"-Wl,-rpath,{lib}"]
    try:
        cflags = subprocess.run(["pkg-config", "--cflags-only-I", "libfabric"], check=True,
                                capture_output=True, text=True).stdout
        libs = subprocess.run(["pkg-config", "--libs-only-L", "libfabric"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [], [], []  # system default paths (e.g. /usr/include/rdma)
    incs = [f[2:] for f in shlex.split(cflags) if f.startswith("-I")]
    libdirs = [f[2:] for f in shlex.split(libs) if f.startswith("-L")]
    return incs, libdirs, []


def _cdef() -> str:
    text = (HERE / "include" / "aiote.h").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
_incs, _libdirs, _link = _libfabric_flags()
ffibuilder.set_source(
    "aiote._native",
    '#include "aiote.h"',
    sources=[os.path.relpath(HERE / "src" / s, ROOT) for s in SOURCES],
    include_dirs=[str(HERE / "include"), str(HERE / "src"), *_incs],
    library_dirs=_libdirs,
    libraries=["fabric", "pthread", "dl"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Werror=implicit-function-declaration", "-fvisibility=hidden"],
    extra_link_args=_link,
)

if __name__ == "__main__":
    # in-place build (aiote/_native*.so next to the package), e.g. for sanitizer builds:
    #   CFLAGS="-fsanitize=address -g" LDFLAGS=-fsanitize=address python native/build.py
    ffibuilder.compile(tmpdir=str(ROOT), verbose=True)
