"""Figures of ``CorpusStats``: each statistic per row, as the tuned-lens paper draws its per-layer curves.

One panel per statistic (KL(final || row), next-token bits per byte, entropy, top-1 = final top-1, next-token
accuracy), rows by depth along the x axis; several statistics (models, lenses, corpora) are overlaid, each
labelled by its name. Only the object-oriented API is used.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

PANELS = (  # (title, values of a CorpusStats -> [R])
    ("KL(final || row), nats", lambda s: s.mean("kl_final")),
    ("next-token cross-entropy, bits per byte", lambda s: s.bits_per_byte),
    ("entropy, nats", lambda s: s.mean("entropy")),
    ("top-1 = final top-1", lambda s: s.mean("agree_final")),
    ("next-token top-1 accuracy", lambda s: s.mean("next_correct")),
)


def plot_stats(stats: dict, *, title: str | None = None) -> Figure:
    """Draw ``{label: CorpusStats}`` (one curve each) in one panel per statistic; returns the Figure."""
    if not stats:
        raise ValueError("plot_stats needs at least one CorpusStats")
    fig = Figure(figsize=(4.2 * len(PANELS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (name, values) in zip(axes, PANELS):
        for label, s in stats.items():
            x = np.arange(len(s.rows))
            ax.plot(x, values(s), marker="o", markersize=3, label=label)
            ax.set_xticks(x, labels=list(s.rows), rotation=90, fontsize=7)
        ax.set_title(name, fontsize=9, parse_math=False)
        ax.set_xlabel("row", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_label(f"stats:{name}")
    axes[0].legend(fontsize=7)
    for t in axes[0].get_legend().get_texts():
        t.set_parse_math(False)
    first = next(iter(stats.values()))
    fig.suptitle(title if title is not None else f"lens statistics over {first.documents} documents, "
                 f"{first.positions} tokens", fontsize=10, parse_math=False)
    return fig
