# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The logit lens, by hand and with gpt2np
#
# This walkthrough retraces nostalgebraist's post *interpreting GPT: the logit lens* (2020). GPT-2
# turns its last residual stream into a prediction with two fixed steps: the final LayerNorm `ln_f`
# and a multiplication by the transpose of the token embedding `wte`. The logit lens applies the same
# two steps to the streams *between* the blocks, and asks what the model "would predict" at each
# depth.
#
# We load a model, look at what its forward pass keeps, write the lens by hand in a few lines of
# NumPy, check it against `gpt2np.logit_lens`, and then draw each figure of the post.
#
# Run it as a script (figures go to `--out`, default `walkthrough-out/`):
#
#     python examples/walkthrough.py --model gpt2 --out walkthrough-out
#
# or open it as a notebook with [jupytext](https://jupytext.readthedocs.io)
# (`jupytext --to notebook examples/walkthrough.py`, or open the `.py` file in Jupyter with jupytext
# installed). `--model` takes a name (`gpt2`, ..., `gpt2-xl`) or a checkpoint folder; in a notebook,
# change the default below.
#
# **The post's figures come from GPT-2 XL** (`--model gpt2-xl`, a 6.4 GB download). The default
# here is GPT-2 small, which is quicker. With a checkpoint of random weights (for example from
# `python scripts/make_checkpoint.py weights/random-gpt2 --shape gpt2`) every step runs the same,
# but the tokens and colours mean nothing: what the text says about the figures is what the post
# reports for the real GPT-2 XL.

# %%
import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np

IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:
    matplotlib.use("Agg")  # a script draws into files only, never a window

import gpt2np  # noqa: E402  (after the backend is chosen)
from gpt2np.plot import VIEWS, save_figure  # noqa: E402

parser = argparse.ArgumentParser(description="A walkthrough of the logit lens with gpt2np.", allow_abbrev=False)
parser.add_argument("--model", default="gpt2", help="checkpoint name (gpt2 ... gpt2-xl) or folder (default: gpt2)")
parser.add_argument("--out", type=Path, default=Path("walkthrough-out"), help="folder for the figures")
args, unknown = parser.parse_known_args()  # a notebook kernel adds arguments of its own: ignore them there
if unknown and not IN_NOTEBOOK:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
args.out.mkdir(parents=True, exist_ok=True)

# The example texts live next to this file. A notebook has no __file__: its current folder is usually
# the notebook's own (examples/), or the repository root in some editors.
HERE = Path(globals().get("__file__", "walkthrough.py")).resolve().parent
if not (HERE / "gpt3_abstract.txt").is_file() and (HERE / "examples" / "gpt3_abstract.txt").is_file():
    HERE = HERE / "examples"


def read_example(name: str) -> str:
    """An example text of examples/, without its final newline (as ``gpt2np lens --file`` reads it)."""
    return (HERE / name).read_text(encoding="utf-8").removesuffix("\n")


def show(fig, name: str) -> None:
    """Save ``fig`` as ``<out>/<name>.png``; in a notebook, also display the saved image."""
    path = save_figure(fig, args.out / f"{name}.png", dpi=100)
    print("wrote", path)
    if IN_NOTEBOOK:
        from IPython.display import Image, display
        display(Image(filename=str(path)))


# %% [markdown]
# ## 1. Load GPT-2 and read the post's text
#
# `gpt2np.load` reads `config.json`, the tokenizer and `model.safetensors`. The numbers that matter
# below are L (blocks), D (the width of the residual stream) and V (the vocabulary).

# %%
model = gpt2np.load(args.model)
cfg, p = model.config, model.params
L, D, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
print(f"{model.name}: L = {L} blocks, D = {D}, H = {cfg.n_head} heads, V = {V} tokens, "
      f"context {cfg.n_positions} positions")

# %% [markdown]
# The post's main example is the abstract of the GPT-3 paper. The model reads the whole text, but the
# figures show two stretches of 10 tokens from its middle, starting at " Specifically". We find
# where that word starts by encoding the text before it: GPT-2's tokenizer never joins a token across
# the space in front of a word, so that prefix is exactly the tokens before the window.

# %%
ABSTRACT = read_example("gpt3_abstract.txt")
ids = model.encode(ABSTRACT)  # [T] token ids
T = len(ids)
if T > cfg.n_positions:
    sys.exit(f"the abstract is {T} tokens, more than the {cfg.n_positions} positions {model.name} reads: "
             "use a checkpoint with a longer context (every GPT-2 has 1024)")
a = len(model.encode(ABSTRACT[:ABSTRACT.index(" Specifically")]))
WINDOWS = [(a, a + 10), (a + 10, a + 20)]  # [start, end) of each stretch
for start, end in WINDOWS:
    print(f"positions {start}..{end - 1} of {T}:", model.tokens(ids[start:end]))

# %% [markdown]
# ## 2. What the forward pass keeps
#
# `model.forward(ids)` returns a frozen `Trace`. Its main field is `trace.resid`, the residual stream
# at every depth, stacked as `[L+1, T, D]`:
#
# - `resid[0]` is the input to block 0: the token embedding plus the position embedding,
#   `wte[ids] + wpe[:T]`;
# - `resid[l + 1]` is the stream after block l, so `resid[L]` is the final stream.
#
# Each block adds two things to the stream: first its attention output, then its MLP output. With
# `sublayers=True` the trace also keeps those (`attn_out`, `mlp_out`, each `[L, T, D]`) and the stream
# between them, `resid_mid` (after block l's attention, before its MLP). Finally `logits [T, V]` is
# the model's output, `ln_f(resid[L]) @ wte.T`. The cell below checks each of these statements.

# %%
trace = model.forward(ids, sublayers=True)
for name in ("ids", "resid", "resid_mid", "attn_out", "mlp_out", "logits"):
    x = getattr(trace, name)
    print(f"trace.{name:<9} shape {str(x.shape):<18} {x.dtype}")


def layer_norm(x, gain=None, bias=None):
    """Normalise each vector of ``x [..., D]`` to mean 0 and variance 1; then ``* gain + bias`` if given."""
    x = x - x.mean(axis=-1, keepdims=True)  # [..., D]
    x = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + cfg.layer_norm_epsilon)  # [..., D]
    return x if gain is None else x * gain + bias


W = p.unembed  # [V, D] the unembedding; in GPT-2 it is wte itself (the weights are tied)
scale = np.abs(trace.resid).max()
assert np.allclose(trace.resid[0], p.wte[ids] + p.wpe[:T], atol=1e-6 * scale)
assert np.allclose(trace.resid_mid, trace.resid[:-1] + trace.attn_out, atol=1e-6 * scale)
assert np.allclose(trace.resid[1:], trace.resid_mid + trace.mlp_out, atol=1e-6 * scale)
model_logits = layer_norm(trace.resid[L], p.ln_f_weight, p.ln_f_bias) @ W.T  # [T, D] @ [D, V] -> [T, V]
assert np.allclose(model_logits, trace.logits, atol=1e-5 * np.abs(trace.logits).max())
print("resid[0] is the embedding, each block adds attn_out and mlp_out, and logits = ln_f(resid[L]) @ W.T")

# %% [markdown]
# ## 3. The logit lens by hand
#
# The lens reads *every* row of `resid` the way the model reads its last one: normalise, multiply by
# `W.T`, softmax. From each row's distribution we keep its top-1 token, the probability of that token,
# and KL(final || row) = sum over tokens v of p_final(v) (log p_final(v) - log p_row(v)): how much
# the row's distribution differs from the final one, in nats. The final row has KL 0 by definition.
#
# The full array of logits would be `[L+1, T, V]`, 0.5 GB for GPT-2 small and 1.8 GB for GPT-2 XL on
# this text, so we read only the 10 positions of the first window. (`gpt2np.logit_lens` never builds
# that array: it works through the positions in chunks and keeps only the few numbers per cell.)
#
# The post reads the rows "after layer norm, but before the learned point-wise transformation": the
# normalisation without `ln_f`'s gain and bias. gpt2np calls that `norm="norm"`; its default,
# `norm="ln_f"`, keeps the gain and bias, so that its last row is exactly the model's output. The
# function below does either.

# %%
def lens_by_hand(rows, gain=None, bias=None):
    """``rows [R, W, D]`` -> logits ``[R, W, V]`` (float32) and log-probabilities ``[R, W, V]`` (float64)."""
    z = layer_norm(rows, gain, bias) @ W.T  # [R, W, D] @ [D, V] -> [R, W, V]
    z64 = z.astype(np.float64)
    zmax = z64.max(axis=-1, keepdims=True)
    logp = z64 - zmax - np.log(np.exp(z64 - zmax).sum(axis=-1, keepdims=True))  # a stable log-softmax
    return z, logp


start, end = WINDOWS[0]
for norm, gain, bias in (("ln_f", p.ln_f_weight, p.ln_f_bias), ("norm", None, None)):
    z, logp = lens_by_hand(trace.resid[:, start:end], gain, bias)  # rows: input, after block 0, ..., after L-1
    top1 = z.argmax(axis=-1)  # [R, W] each row's best guess
    top1_prob = np.exp(logp.max(axis=-1))  # [R, W] its probability
    final = logp[-1]  # [W, V] the last row: the final distribution
    kl = (np.exp(final) * (final - logp)).sum(axis=-1)  # [R, W] KL(final || row), nats

    lens = gpt2np.logit_lens(model, trace, start=start, end=end, norm=norm)
    assert lens.rows == ("input", *(str(l) for l in range(L)))  # the same rows, in the same order
    # Two matrix products that add the same numbers in another order can differ in the last bits of
    # float32, so where a row's two best logits are within that rounding of each other, either token is a
    # correct top-1. Everywhere else the top-1 must be the same token.
    best2 = np.partition(z, -2, axis=-1)[..., -2:]  # [R, W, 2] the two largest logits
    clear = best2[..., 1] - best2[..., 0] > 1e-5 * np.abs(z).max()
    assert np.array_equal(top1[clear], lens.top1[clear]), "the top-1 tokens differ"
    assert np.allclose(top1_prob, lens.top_probs[..., 0], rtol=1e-4, atol=1e-6), "the top-1 probabilities differ"
    assert np.allclose(kl, lens.kl_final, rtol=1e-4, atol=1e-4), "KL(final || row) differs"
    print(f"norm={norm}: by hand and gpt2np.logit_lens agree on {top1.size} cells "
          f"({np.count_nonzero(~clear)} near-ties); KL of the input row {kl[0].mean():.2f} nats on average")

# %% [markdown]
# In `ln_f` mode the last row of the hand-made lens is the model's own output, which the trace check
# above already showed. In `norm` mode, "final" means the final stream read in the same way (without
# gain and bias), so KL(final || last row) is 0 in both modes.
#
# The `Lens` that `gpt2np.logit_lens` returns holds, per (row, position): `top_ids`, `top_tokens`,
# `top_logits` and `top_probs` (the top k = 5), `final_rank`, `kl_final`, `kl_input`, `input_rank`,
# `entropy` and the true next token's `next_rank` / `next_prob`. The figures below draw these.

# %% [markdown]
# ## 4. The post's figures
#
# From here on we read the stream as the post does: `norm="norm"`. The post shows every other block
# of GPT-2 XL's 48 (`step=2`, counting back from the last, so blocks 47, 45, ..., 1); for models with
# fewer blocks we show them all. `gpt2np.plot_lens(lens, view)` draws one figure; the view names are
# those of `gpt2np.plot.VIEWS`.
#
# How to read a figure: one cell per (row, position). Rows are depths, from `input` (the embedding)
# at the bottom to the last block at the top. Along the bottom are the input tokens; along the top the
# true next token, marked `*` where the model's final top-1 is right. The text in a cell is that row's
# top-1 guess (a space is drawn `·`, a newline `↵`). A cell is outlined when its guess already equals
# the final top-1 at that position. In every view, light means "good" (high logit, low rank, low KL).

# %%
STEP = 2 if L >= 24 else 1
print("views:", ", ".join(VIEWS), f"| step {STEP}")


def lens_of(tr, window, **options):
    """The post's lens (``norm="norm"``, every STEP-th block) of trace ``tr`` over ``window = (start, end)``."""
    return gpt2np.logit_lens(model, tr, start=window[0], end=window[1], norm="norm", step=STEP, **options)


no_input = [lens_of(trace, w, include_input=False) for w in WINDOWS]  # the post's logits and ranks figures
with_input = [lens_of(trace, w) for w in WINDOWS]  # its KL figures include the input row

# %% [markdown]
# ### Logits
#
# The colour is the logit of the cell's own top-1 guess (not of the final token). The post leaves
# out the input row here: it is so different from the rest that it distracts the eye. In the post's
# figures these logits "tend to increase steadily as the model converges on a good guess, then get
# refined in the last layers", and the early guesses are often sensible: after "GPT-3, an" an early
# guess is "enormous" or "massive"; after "an aut" the lens first guesses "oreceptor" before
# converging on "oregressive".

# %%
for i, lens in enumerate(no_input, 1):
    show(gpt2np.plot_lens(lens, "logits"), f"abstract-{i}-logits")

# %% [markdown]
# ### Ranks of the final top-1 token
#
# A top-1 guess says nothing about the runners-up. This view keeps the model's *final* top-1 token at
# each position and colours each cell by that token's rank under the row (1 = the row's own top-1;
# ties count in the token's favour). The scale bottoms out at rank 100. Note that this is the rank of
# the model's final guess, not of the true next token (that is the `next-rank` view). The post finds
# that by the middle layers the final answer is usually already among the first few candidates.

# %%
for i, lens in enumerate(no_input, 1):
    show(gpt2np.plot_lens(lens, "ranks"), f"abstract-{i}-ranks")
print("rank of the final top-1 under each row, first window:")
for row, ranks in zip(no_input[0].rows, no_input[0].final_rank):
    print(f"  {row:>6}", ranks)

# %% [markdown]
# ### KL(final || row)
#
# KL divergence compares whole distributions, not just their best tokens. The scale is capped at 30
# nats, and this time the input row is included. The post's reading: right after the first block the
# distribution already looks more like the final output than like the input, and from there it
# converges smoothly. The row index where the top-1 settles for good is `lens.lock_in`.

# %%
for i, lens in enumerate(with_input, 1):
    show(gpt2np.plot_lens(lens, "kl"), f"abstract-{i}-kl")
lens = with_input[0]
print("mean KL(final || row) over the first window:",
      ", ".join(f"{row} {v:.2f}" for row, v in zip(lens.rows, lens.kl_final.mean(axis=1))))
print("first row from which the top-1 stays the final one:", [lens.rows[r] for r in lens.lock_in])

# %% [markdown]
# ### Copying a rare token
#
# "Sometimes, when people say plasma, they mean a state of matter. Other times, when people say
# plasma". The last " plasma" can only be predicted by copying the earlier one. The post shows the
# last 8 positions: the model does predict " plasma" at the last position but one, but only in the
# very last layers; before that its rank is far down. Below, `next_rank` is the rank of the true
# next token under each row.

# %%
PLASMA = read_example("plasma.txt")
plasma_ids = model.encode(PLASMA)
plasma = model.forward(plasma_ids)
Tp = len(plasma_ids)
lens = lens_of(plasma, (Tp - 8, Tp), include_input=False)
show(gpt2np.plot_lens(lens, "logits"), "plasma-logits")
show(gpt2np.plot_lens(lens, "ranks"), "plasma-ranks")
print(f"rank of the true next token {model.tokens(plasma_ids[-1:])[0]!r} at position {Tp - 2}, per row:",
      dict(zip(lens.rows, lens.next_rank[:, -2].tolist())))

# %% [markdown]
# ### Extreme repetition
#
# When a text repeats itself exactly, at what depth is the pattern noticed? The post's own text is
# not given; `examples/repetition.txt` is a stand-in, one sentence of 16 tokens repeated five times.
# We show the fifth round. In the post's example the repetition is picked up in the upper half of
# the network, while the lower half cannot see it even after several rounds.

# %%
REPETITION = read_example("repetition.txt")
rep_ids = model.encode(REPETITION)
rep = model.forward(rep_ids)
fifth = len(model.encode(REPETITION[:REPETITION.rindex(" My")]))  # where the fifth round starts
lens = lens_of(rep, (fifth, len(rep_ids)), include_input=False)
show(gpt2np.plot_lens(lens, "logits"), "repetition-logits")
show(gpt2np.plot_lens(lens, "ranks"), "repetition-ranks")

# %% [markdown]
# ### Addendum: comparing with the input
#
# KL is not a distance: it is not symmetric and does not obey the triangle inequality, so the picture
# of one jump and then a smooth path can mislead. The addendum therefore measures from the other end:
# KL(input || row), where "input" is the input row read through the same lens (the `kl-input` view,
# on the same 0-30 scale), and the rank of the *input* token under each row (`input-rank`, on a scale
# that bottoms out at 1000 instead of 100). In the post there is still a fast jump after the input,
# but a much smaller one, and many input tokens keep ranks in the hundreds or thousands. The first
# " plasma" (position 5 of the plasma text) is strikingly well preserved.

# %%
show(gpt2np.plot_lens(with_input[0], "kl-input"), "abstract-1-kl-input")
show(gpt2np.plot_lens(with_input[0], "input-rank"), "abstract-1-input-rank")
first = len(model.encode(PLASMA[:PLASMA.index(" plasma")]))  # the position of the first " plasma" (5)
lens = lens_of(plasma, (0, first + 5))
show(gpt2np.plot_lens(lens, "kl-input"), "plasma-first-kl-input")
show(gpt2np.plot_lens(lens, "input-rank"), "plasma-first-input-rank")
print(f"rank of the input token {model.tokens(plasma_ids[first:first + 1])[0]!r} (position {first}), per row:",
      dict(zip(lens.rows, lens.input_rank[:, first].tolist())))

# %% [markdown]
# ## 5. Beyond the post: sub-rows and the decoder variant
#
# The author's later notebook went further in two ways; gpt2np has both.
#
# ### Sub-rows: the attention half and the MLP half of each block
#
# A block writes to the stream twice. With `sublayers=True` the lens adds the row `l.attn` (the
# stream after block l's attention, before its MLP: `resid_mid`) below each block's row `l`. Reading
# up the figure, the change from row `l-1` to `l.attn` is what block l's attention wrote, and the
# change from `l.attn` to `l` what its MLP wrote. The table after the figure shows the mean KL(final
# || row) at each step, with every block.

# %%
show(gpt2np.plot_lens(lens_of(trace, WINDOWS[0], sublayers=True), "kl"), "abstract-1-sublayers-kl")
sub = gpt2np.logit_lens(model, trace, start=start, end=end, norm="norm", sublayers=True)  # every block
kl_row = dict(zip(sub.rows, sub.kl_final.mean(axis=1)))
print("block  KL before  after attention  after MLP   (mean over the first window, nats)")
for l in range(L):
    before = kl_row["input" if l == 0 else str(l - 1)]
    print(f"{l:>5}  {before:9.2f}  {kl_row[f'{l}.attn']:15.2f}  {kl_row[str(l)]:9.2f}")

# %% [markdown]
# ### The decoder: normalisation options and the last blocks
#
# What turns a row into a distribution is the lens's *decoder*. Its normalisation is one of:
#
# - `norm="ln_f"`: the model's final LayerNorm, gain and bias included (gpt2np's default: the last
#   row is then exactly the model's output);
# - `norm="norm"`: the normalisation alone (the post's figures);
# - `norm="raw"`: no normalisation: the row times `W.T` as it is.
#
# The later notebook found that on some models (GPT-Neo) the plain lens shows little until the last
# block joins the decoder: every row is first run through the model's last block (over the whole
# prefix, causally, exactly as the model runs it), then normalised and unembedded. That is
# `decoder_blocks=1`; the row of that block itself is no longer shown. `gpt2np.self_check` confirms
# the idea on the row before the last block: run through the last block and `ln_f`, it gives the
# model's logits back.

# %%
for norm in ("ln_f", "norm", "raw"):
    lens = gpt2np.logit_lens(model, trace, start=start, end=end, norm=norm)
    print(f"norm={norm:<4}  mean KL(final || row):", " ".join(f"{v:.2f}" for v in lens.kl_final.mean(axis=1)))
checks = gpt2np.self_check(model, trace)
print("self_check (largest logit difference / largest logit):", checks)
assert max(checks.values()) < 1e-4
lens = lens_of(trace, WINDOWS[0], decoder_blocks=1)
print("rows with the last block in the decoder:", lens.rows)
show(gpt2np.plot_lens(lens, "kl"), "abstract-1-decoder-blocks-1-kl")

# %% [markdown]
# ## Where next
#
# Every figure above is one command of `gpt2np lens` (see the README's gallery, e.g.
# `gpt2np lens --file examples/gpt3_abstract.txt --model gpt2-xl --norm norm --step 2 --no-input
# --start 136 --end 146 --view logits --out abstract-1-logits.png`). `lens.save("lens.npz")` keeps
# every number behind a figure, and the `entropy` and `next-rank` views (the row's uncertainty, and
# the rank of the token that really came next) were not in the post but are one argument away.
# The whole lens is `gpt2np/lens.py`, a loop that fits on one screen.

# %%
print(f"done: the figures are in {args.out}")
