"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

The sources ship in ``kvcompress/csrc``. A library is built once per source, compiler flags and CPU
into ``<cache_dir>/native/`` (well under a second) and reused by later processes. Without a compiler,
or where the build fails, :func:`load` returns None and says once on stderr that the plain-PyTorch
reference path is used instead; ``KVCOMPRESS_NATIVE=0`` asks for that path on purpose.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvcompress.folders import cache_dir

SOURCES = Path(__file__).parent / "csrc"
# -march=native: the library is built on the machine that runs it (the CPU is part of its name).
CFLAGS = ("-O3", "-march=native", "-std=c99", "-shared", "-fPIC")
LIBS = ("-lm",)  # after the source: expf


def _cpu() -> str:
    """What the build depends on besides the source: architecture and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        return libc if hasattr(libc, "malloc_trim") else None  # glibc's; other C libraries have no such call
    except OSError:
        return None


def trim_heap() -> None:
    """Give the memory that freed pages left inside the C heap back to the system (glibc's
    ``malloc_trim``; nothing where the C library has no such call). Pages are small allocations that
    the heap keeps after they are freed: without this, a 4,096-token prompt cut to a quarter, layer
    after layer, kept about 200 MiB more resident memory than the tokens it holds
    (``experiments/prefill-trim-4096-2026-12-07.txt``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def custom_op(name: str, mutates: tuple[str, ...] = ()):
    """Register the decorated function as the ``torch.library`` custom op ``name``, which writes into the
    arguments named in ``mutates`` (none by default).

    The returned callable goes through the dispatcher only while ``torch.compile`` traces (the op, with
    the fake implementation given to ``.register_fake``, is what a compiled graph holds); in eager mode
    it calls the function itself: the dispatcher costs about 20 microseconds a call, 0.6 ms of a decode
    step that calls a kernel once per layer of a 30-layer model. ``.op`` is the registered op."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

        call.op, call.register_fake = op, op.register_fake
        return call

    return register


def data_pointer(t) -> ctypes.c_void_p:
    """The address a C kernel reads the tensor ``t`` at (NULL for an empty tensor)."""
    return ctypes.c_void_p(t.data_ptr() if t.numel() else None)


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``csrc/<name>.c``, built on first use; None (said once) when it cannot be."""
    if os.environ.get("KVCOMPRESS_NATIVE", "1") == "0":
        return None
    source = SOURCES / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))  # what the sources include
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(CFLAGS + LIBS).encode() + _cpu().encode()).hexdigest()[:16]
    library = cache_dir() / "native" / f"{name}-{digest}.so"
    try:
        if not library.is_file():
            if compiler is None:
                raise OSError("no C compiler (cc or gcc) on PATH; set CC")
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built = Path(tmp) / library.name
                result = subprocess.run([compiler, *CFLAGS, str(source), *LIBS, "-o", str(built)], capture_output=True, text=True)
                if result.returncode:
                    raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
                built.replace(library)  # atomic: a concurrent process sees all of it or nothing
        return ctypes.CDLL(str(library))
    except OSError as err:
        print(f"kvcompress: cannot build the C kernels of {name} ({err}); using the plain-PyTorch reference path", file=sys.stderr)
        return None
