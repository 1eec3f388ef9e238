"""Model configuration: the five numbers that define a GPT-2, and the official size table."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    """Hyper-parameters of a GPT-2 model, read from a checkpoint's ``config.json``.

    Dimension legend used across gpt2np: L = n_layer, D = n_embd, H = n_head,
    V = vocab_size, T = positions in a sequence (T <= n_positions), F = MLP width.
    """

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    # transformers' GPT2Config options that change the arithmetic (GPT-2's own values by default)
    scale_attn_weights: bool = True  # scores times 1/sqrt(d); False: no scaling at all
    scale_attn_by_inverse_layer_idx: bool = False  # True: block l's scores also divided by l + 1
    tie_word_embeddings: bool = True  # the unembedding is wte; False: the file holds lm_head.weight

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def attn_scale(self, layer: int) -> float:
        """The factor block ``layer``'s attention scores ``q @ k.T`` are multiplied by, as transformers
        computes it: ``d ** -0.5`` (1 when ``scale_attn_weights`` is false), divided by ``layer + 1`` when
        ``scale_attn_by_inverse_layer_idx``."""
        s = self.d_head ** -0.5 if self.scale_attn_weights else 1.0
        return s / float(layer + 1) if self.scale_attn_by_inverse_layer_idx else s

    @property
    def options(self) -> dict:
        """The arithmetic options that differ from GPT-2's own (what ``gpt2np info`` shows)."""
        default = Config(n_layer=1, n_head=1, n_embd=1)
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) != getattr(default, k)}

    @property
    def n_params(self) -> int:
        """Parameter count with the tied unembedding counted once (as in the official table)."""
        D, F, L = self.n_embd, self.d_mlp, self.n_layer
        block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        return self.vocab_size * D + self.n_positions * D + L * block + 2 * D

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        """Read the keys gpt2np needs from a transformers-style ``config.json``; ignore the rest."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: a GPT-2 checkpoint folder needs config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        missing = [k for k in ("n_embd", "n_layer", "n_head") if k not in raw]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: is this a GPT-2 config.json?")
        check_options(raw, path)
        return cls(
            n_layer=int(raw["n_layer"]),
            n_head=int(raw["n_head"]),
            n_embd=int(raw["n_embd"]),
            n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            vocab_size=int(raw.get("vocab_size", 50257)),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            n_inner=raw.get("n_inner"),
            **{k: raw[k] for k in OPTIONS if k in raw},
        )

    def to_json(self) -> dict:
        """The config.json that transformers' GPT2Config reads."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "activation_function": "gelu_new", "n_ctx": self.n_positions,
            "n_embd": self.n_embd, "n_head": self.n_head, "n_inner": self.n_inner,
            "n_layer": self.n_layer, "n_positions": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_epsilon, "vocab_size": self.vocab_size,
            "bos_token_id": self.vocab_size - 1, "eos_token_id": self.vocab_size - 1,
            **self.options,  # only where they differ from GPT-2's, as the official config.json has none
        }


# config.json options that change the arithmetic and that gpt2np implements (each a Config field).
OPTIONS = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings")
# GPT-2's tanh GELU under each of transformers' names for it (ACT2FN; equal to float32 rounding, tested).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh", "gelu_accurate")
# Options read as they are: the arithmetic is GPT-2's either way (reorder_and_upcast_attn changes only
# the order of operations in float16 training, and is the same product in float32), or they do not touch
# inference (dropouts, summary_* heads, token ids, use_cache, initializer_range, torch_dtype, ...).


# Every config.json key that changes the arithmetic, with GPT-2's own value: ``gpt2np info`` lists each
# one a folder sets otherwise, whether gpt2np implements it (above) or refuses it (below).
ARITHMETIC = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
              "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "add_cross_attention": False,
              "is_causal": True, "quantization_config": None}


def arithmetic_options(path: str | Path) -> dict:
    """The options of a config.json that change the arithmetic and differ from GPT-2's own (raw values)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: raw[k] for k in ARITHMETIC if k in raw and raw[k] != ARITHMETIC[k]}


def check_options(raw: dict, path) -> None:
    """Refuse a config.json option that changes the arithmetic and that gpt2np does not implement."""
    def refuse(key, why):
        raise ValueError(f"{path}: {key}={json.dumps(raw[key])} is not implemented by gpt2np ({why}); "
                         "it would compute other numbers than the checkpoint's model")

    if raw.get("model_type", "gpt2") != "gpt2":
        refuse("model_type", "it reads GPT-2 checkpoints only")
    if raw.get("activation_function", "gelu_new") not in TANH_GELU:
        refuse("activation_function", f"GPT-2's tanh GELU only: {', '.join(TANH_GELU)}")
    if raw.get("is_causal", True) is not True:
        refuse("is_causal", "GPT-2 attends to earlier positions only")
    if raw.get("add_cross_attention", False):
        refuse("add_cross_attention", "blocks with cross-attention belong to an encoder-decoder model")
    if raw.get("quantization_config") is not None:
        refuse("quantization_config", "it reads float weights only")
    for key in OPTIONS:
        if key in raw and not isinstance(raw[key], bool):
            raise ValueError(f"{path}: {key}={json.dumps(raw[key])} must be true or false")


# The four official checkpoints (Hugging Face repos openai-community/<name>).
SIZES: dict[str, Config] = {
    "gpt2": Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": Config(n_layer=48, n_head=25, n_embd=1600),
}
