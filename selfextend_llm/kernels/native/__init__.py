"""Small C kernels for the CPU, built at first use with the machine's C compiler and loaded with ctypes.

Why C: on the CPU a decode step is bound by memory reads, and the library calls it would
otherwise use read at about half the machine's bandwidth.  MKL's batched matrix product with
three query rows per KV head reads a 6 MB key cache at ~15 GB/s on this project's 2-core
machine, where one plain loop over the same bytes reads 30 GB/s.  The kernels here are plain
loops that the compiler vectorises for the CPU it runs on (``-march=native``).

One file per kernel (``decode.c``, ``quantized.c``, ``step.c``; their Python sides in :mod:`.decode`,
:mod:`.quantized` and :mod:`.step`), the loops they share in ``common.h``; this module is the shared
part: build, cache, load.  A build is cached in ``<cache folder>/native/``, keyed by the
sources, the compiler, its flags and the CPU, so that a cache folder shared between machines
never loads code built for another CPU.  Without a compiler (or with
``SELFEXTEND_NATIVE_KERNELS=0``) every caller falls back to the PyTorch code the kernel
replaces: the same results up to summation order, only slower.  :func:`unavailable` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

SOURCES = ("decode.c", "quantized.c", "step.c")
#: Included by the sources: part of what a build is keyed by.
HEADERS = ("common.h",)
# Reassociation (and only that) lets the compiler vectorise the dot products' sums.
OPTIMISE = ["-O3", "-fPIC", "-shared", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
# Tried in order: the first that builds is kept (Apple's clang has no -fopenmp; some have no -march=native).
VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
ENV_SWITCH = "SELFEXTEND_NATIVE_KERNELS"

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "se_decode_scores": [_I64] * 6 + [_PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _FLOAT, _I64, _INT, _PTR],
    "se_decode_values": [_I64] * 5 + [_PTR, _PTR, _I64, _I64, _I64, _INT, _PTR],
    "se_product_q4": [_I64] * 3 + [_PTR] * 5 + [_I64, _INT],
    "se_product_i8": [_I64] * 3 + [_PTR] * 5 + [_I64, _INT],
    "se_step_scratch": [_I64] * 8,
    "se_decode_layers": [_I64, _PTR, _PTR, _PTR],
}
#: Return types of the functions that return something (the others return nothing).
RESULTS = {"se_step_scratch": _I64, "se_decode_layers": _INT, "se_product_q4": _INT, "se_product_i8": _INT}

_lock = threading.Lock()
_state: dict[str, object] = {}


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (found := shutil.which(name)):
            return found
    return None


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU's model and flags."""
    key = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return key
    wanted = [line for line in info.splitlines()[:40] if line.startswith(("model name", "flags", "Features"))]
    return key + "\n" + "\n".join(sorted(set(wanted)))


def _build(cc: str, folder: Path) -> tuple[Path, list[str]]:
    """Build the library into ``folder`` (cached by content); returns its path and the flags used."""
    here = Path(__file__).parent
    sources = [here / name for name in SOURCES]
    digest = hashlib.sha256()
    texts = [(here / name).read_text() for name in (*SOURCES, *HEADERS)]
    for part in [cc, _cpu_key(), *texts, *OPTIMISE]:
        digest.update(part.encode())
    errors = []
    for number, variant in enumerate(VARIANTS):
        flags = OPTIMISE + variant
        target = folder / f"selfextend_native_{digest.hexdigest()[:16]}_{number}.so"
        if target.is_file():
            return target, flags
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            run = subprocess.run(
                [cc, *flags, *map(str, sources), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=120
            )
            if run.returncode == 0:
                os.replace(built, target)  # atomic: another process may build the same file
                return target, flags
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    raise OSError(f"{cc} could not build the kernels: {errors[0]}")


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _state["why"] = f"{ENV_SWITCH}=0"
        return None
    cc = compiler()
    if cc is None:
        _state["why"] = "no C compiler on the PATH (install gcc or clang, or set CC)"
        return None
    from ...loading import cache_root

    try:
        path, flags = _build(cc, cache_root() / "native")
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        _state["why"] = str(err)
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESULTS.get(name)
    _state["flags"] = flags
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call (about a second); None where they cannot be built."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def unavailable() -> str | None:
    """None if the kernels run here, else why not (the callers then use PyTorch)."""
    return None if library() is not None else str(_state.get("why", "not built"))


def describe() -> dict[str, object]:
    """For ``describe()``: whether the kernels run, with which flags, or why not."""
    lib = library()
    return {"native_kernels": lib is not None, "flags": _state.get("flags"), "why_not": _state.get("why")}


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The C kernels off inside the block (every caller takes its PyTorch path): to compare the two.

    Process-wide, not per thread: meant for benchmarks and tests, not for a serving process.
    """
    library()  # built (or not) before, so that leaving the block restores the same state
    saved = _state["lib"]
    _state["lib"] = None
    try:
        yield
    finally:
        _state["lib"] = saved


def reset() -> None:
    """Forget the loaded library (tests: rebuild under another environment)."""
    with _lock:
        _state.clear()
