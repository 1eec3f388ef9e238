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

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

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
        act = raw.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ValueError(f"{path}: activation_function={act!r}; gpt2np implements GPT-2's 'gelu_new' only")
        return cls(
            n_layer=int(raw["n_layer"]),
            n_head=int(raw["n_head"]),
            n_embd=int(raw["n_embd"]),
            n_positions=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
            vocab_size=int(raw.get("vocab_size", 50257)),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            n_inner=raw.get("n_inner"),
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
        }


# The four official checkpoints (Hugging Face repos openai-community/<name>).
SIZES: dict[str, Config] = {
    "gpt2": Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": Config(n_layer=48, n_head=25, n_embd=1600),
}
