"""Array backends. The array module always comes from the arrays themselves (NumPy, CuPy, or any
namespace of the Python array API standard); CuPy is imported only when the GPU is asked for."""
from __future__ import annotations

import os

import numpy as np


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Functions of the array API standard that gpt2np uses and that CuPy gained only with version 14
# (when its main namespace came to mirror NumPy 2's): an older CuPy fails on them mid-computation.
CUPY_NEEDS = ("permute_dims", "concat", "astype")


def namespace(x):
    """The array module of ``x`` (``numpy`` for NumPy arrays, ``cupy`` for CuPy arrays, ...)."""
    try:
        return x.__array_namespace__()
    except AttributeError:
        if type(x).__module__.split(".")[0] == "cupy":  # a CuPy without the array API protocol
            import cupy
            return cupy
        raise TypeError(f"expected an array (NumPy, CuPy or another array API library), "
                        f"got {type(x).__name__}") from None


def is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def to_numpy(x):
    """Bring an array back to host NumPy (for figures and files); None and NumPy values pass through.

    CuPy arrays are copied with ``.get()``; any other array API array (e.g. ``array_api_strict``)
    through DLPack; NumPy scalars (what NumPy reductions return) and Python numbers stay as they are.
    """
    if x is None or isinstance(x, (np.ndarray, np.generic, int, float, complex)):
        return x
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return np.from_dlpack(x)


def gpu():
    """Return the ``cupy`` module if a CUDA device is usable, else raise with what to do.

    ``import cupy`` succeeds on machines without a GPU, so availability is checked explicitly.
    """
    try:
        import cupy
    except ImportError:
        raise RuntimeError('device="gpu" needs CuPy: pip install "gpt2np[gpu]" (CuPy with its CUDA '
                           "libraries), then try again") from None
    try:
        usable = cupy.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
        if usable:
            cupy.zeros(1, dtype=cupy.float32).get()  # a real allocation: drivers can still fail here
    except Exception as e:  # CUDA driver errors come in several types
        raise RuntimeError(f"CuPy is installed but no GPU is usable ({e}); use device='cpu'") from None
    if not usable:
        raise RuntimeError("CuPy is installed but no GPU is usable (no CUDA device found); use device='cpu'")
    missing = [name for name in CUPY_NEEDS if not hasattr(cupy, name)]
    if missing:
        raise RuntimeError(f"CuPy {getattr(cupy, '__version__', '?')} lacks {', '.join(missing)} of the array API "
                           'standard: gpt2np needs CuPy >= 14; pip install -U "gpt2np[gpu]"')
    return cupy


def device_namespace(device: str):
    """'cpu' -> numpy, 'gpu' (or 'cuda') -> cupy (checked); anything else is an error."""
    if device == "cpu":
        return np
    if device in ("gpu", "cuda"):
        return gpu()
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")
