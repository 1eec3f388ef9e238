"""Test helpers for running gpt2np through a second array namespace on the CPU.

``array_api_strict`` implements the Python array API standard and nothing else, so code that runs
on it uses no NumPy-only feature; that is the CPU proof that the same code runs on CuPy. Its arrays
are still convertible to NumPy (``np.asarray`` works on them, silently), so ``host_conversion_blocked``
makes that raise, as it does for CuPy arrays: a stray ``np.*`` call on the hot path then fails.

    from _strict import strict_model, host_conversion_blocked
    sm = strict_model(model)
    with host_conversion_blocked():
        trace = sm.forward(ids)
"""
from __future__ import annotations

import contextlib
import dataclasses

import array_api_strict as xs
import numpy as np

from gpt2np import backend

StrictArray = type(xs.asarray(0.0))


def strict_model(model):
    """The same ``Model`` with every parameter an ``array_api_strict`` array (same values)."""
    return dataclasses.replace(model, params=model.params.map(xs.asarray))


def is_strict(x) -> bool:
    return isinstance(x, StrictArray)


@contextlib.contextmanager
def host_conversion_blocked():
    """Make ``np.asarray(strict_array)`` (and every NumPy function given one) raise, as with CuPy.

    ``np.from_dlpack``, the explicit way back used by ``backend.to_numpy``, keeps working.
    """
    def refuse(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to NumPy (a NumPy call on the hot path?)")

    saved = {name: StrictArray.__dict__[name] for name in ("__array__", "__buffer__") if name in StrictArray.__dict__}
    try:
        for name in saved:
            setattr(StrictArray, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(StrictArray, name, fn)


def arrays_of(obj, prefix: str = "") -> dict:
    """Flatten a result (array, dataclass, tuple/list, dict) into ``{path: array-or-scalar}``."""
    if obj is None or isinstance(obj, (str, bytes)):
        return {}
    if hasattr(obj, "__array_namespace__") or isinstance(obj, (np.generic, int, float, bool)):
        return {prefix or ".": obj}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(arrays_of(v, f"{prefix}.{k}"))
    return out


def _host(x) -> np.ndarray:
    return np.asarray(backend.to_numpy(x))


def assert_same_result(got, want, rtol: float = 1e-5) -> None:
    """Every array in ``got`` matches ``want``: same shape and dtype, integers and booleans exactly,
    floats within ``rtol`` of the field's largest magnitude (NaN where ``want`` has NaN)."""
    g, w = arrays_of(got), arrays_of(want)
    assert g.keys() == w.keys(), f"different fields: {sorted(g.keys() ^ w.keys())}"
    assert w, "nothing to compare"
    for k in w:
        a, b = _host(g[k]), _host(w[k])
        assert a.shape == b.shape, f"{k}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"{k}: dtype {a.dtype} != {b.dtype}"
        if a.dtype.kind not in "fc":
            np.testing.assert_array_equal(a, b, err_msg=k)
            continue
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{k}: NaN positions differ")
        finite = np.isfinite(b)
        if finite.any():
            scale = float(np.max(np.abs(b[finite]))) or 1.0
            err = float(np.max(np.abs(a[finite] - b[finite])))
            assert err <= rtol * scale, f"{k}: max abs error {err:.3g} > {rtol:g} x {scale:.3g}"
