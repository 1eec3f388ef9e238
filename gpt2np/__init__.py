"""gpt2np: GPT-2 in pure NumPy, built to look inside the model.

>>> import gpt2np
>>> model = gpt2np.load("gpt2")                      # weights/gpt2/, downloaded once
>>> trace = model.forward(model.encode("Hello world"))
>>> trace.resid.shape                                # [L+1, T, D] every residual stream
"""
from .api import Model, load, logit_lens
from .attribute import attribute, decompose
from .config import SIZES, Config
from .corpus import CorpusStats, compare_stats, corpus_stats
from .lens import self_check
from .result import Lens
from .model import Trace
from .tuned import TunedLens
from .weights import download

__all__ = ["Config", "CorpusStats", "Lens", "Model", "SIZES", "Trace", "TunedLens", "attribute", "compare_stats", "corpus_stats", "decompose", "download", "load", "logit_lens",
           "plot_attribution", "plot_lens", "plot_views", "self_check"]
__version__ = "0.1.0"


def __getattr__(name):
    """``gpt2np.plot_lens`` / ``plot_views`` / ``plot_attribution`` import matplotlib only when first used."""
    if name in ("plot_lens", "plot_views"):
        from . import plot
        return getattr(plot, name)
    if name == "plot_attribution":
        from .plot_attribute import plot_attribution
        return plot_attribution
    raise AttributeError(f"module 'gpt2np' has no attribute {name!r}")
