"""Text encoders: :class:`HashTextEncoder` (weight-free, offline) and :class:`HFTextEncoder` (local checkpoint).

Both return ``(emb [B, L, dim] float32, mask [B, L] bool)`` with ``L = max_len`` for every batch, so
embeddings of different batches (and a cached empty-prompt embedding for guidance) stack together.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from semanticgen._checks import as_dtype, check_int

from .checkpoint_files import directory_problem, missing_one_of

__all__ = ["HashTextEncoder", "HFTextEncoder"]

_WORD = re.compile(r"\w+|[^\w\s]")
_EOS = "</s>"


def _check_prompts(prompts: object, who: str) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{who}: prompts must be a list of str, got a single str (wrap it in a list)")
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{who}: prompts must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{who}: prompts is empty")
    return list(prompts)


class HashTextEncoder(nn.Module):
    """Deterministic bag-of-hashed-words text encoder that needs no weights.

    A prompt is lower-cased and split into words and punctuation; an end token is appended (so every
    prompt, even ``""``, has at least one valid token, as with T5). Each token's embedding is a
    standard-normal vector drawn from a generator seeded with ``crc32(token)`` and ``seed`` (stable across
    runs, machines and Python hash seeds; no vocabulary table, so no collisions and any ``dim``), plus
    a sinusoidal position code scaled by 0.5 so word order matters. Prompts longer than
    ``max_len - 1`` words are truncated.

    Shapes: ``encode(prompts: list[str]) -> (emb [B, max_len, dim] float32, mask [B, max_len] bool)``.

    Example:
        >>> enc = HashTextEncoder(dim=32, max_len=16)
        >>> emb, mask = enc.encode(["red square", "blue circle"])
        >>> emb.shape, mask.sum(1).tolist()
        (torch.Size([2, 16, 32]), [3, 3])
    """

    def __init__(self, dim: int = 64, max_len: int = 32, *, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        check_int("dim", dim, minimum=1, who="HashTextEncoder")
        check_int("max_len", max_len, minimum=1, who="HashTextEncoder")
        self.dim = dim
        self.max_len = max_len
        self.seed = int(seed)
        self._cache: dict[str, torch.Tensor] = {}
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        table = torch.zeros(max_len, dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self.register_buffer("positions", (0.5 * table).float(), persistent=False)
        self.to(device)

    @property
    def device(self) -> torch.device:
        """Where :meth:`encode` returns its tensors (follows ``.to(device)``)."""
        return self.positions.device

    @staticmethod
    def tokenize(prompt: str) -> list[str]:
        """Lower-cased words and punctuation marks, then the end token."""
        return [*_WORD.findall(prompt.lower()), _EOS]

    def token_embedding(self, token: str) -> torch.Tensor:
        """The fixed ``[dim]`` embedding of one token (cached)."""
        emb = self._cache.get(token)
        if emb is None:
            key = (zlib.crc32(token.encode("utf-8")) << 20) ^ (self.seed & 0xFFFFF)
            emb = torch.randn(self.dim, generator=torch.Generator().manual_seed(key))
            if len(self._cache) < 65536:
                self._cache[token] = emb
        return emb

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` -> ``(emb [B, max_len, dim] float32, mask [B, max_len] bool)``."""
        prompts = _check_prompts(prompts, "HashTextEncoder.encode")
        emb = torch.zeros(len(prompts), self.max_len, self.dim)
        mask = torch.zeros(len(prompts), self.max_len, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            tokens = self.tokenize(prompt)
            tokens = tokens[: self.max_len - 1] + [_EOS] if len(tokens) > self.max_len else tokens
            for i, token in enumerate(tokens):
                emb[b, i] = self.token_embedding(token)
            mask[b, : len(tokens)] = True
        emb[mask] += self.positions.cpu().expand(len(prompts), -1, -1)[mask]
        return emb.to(self.device), mask.to(self.device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


# What transformers' from_pretrained reads: one file, or an index of shards.
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Files a saved tokenizer leaves: its config and fast tokenizer, or the vocabulary a slow one reads (T5 and umT5's
# spiece.model, BERT's vocab.txt, ...). A diffusers pipeline keeps them in tokenizer/, apart from text_encoder/.
_HF_TOKENIZER = (
    "tokenizer_config.json",
    "tokenizer.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
)

# Encoder-decoder families whose encoder half has its own class, so the decoder's weights are never loaded.
_ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class HFTextEncoder(nn.Module):
    """Any local ``transformers`` text encoder (T5/umT5 encoder, BERT-like, ...), loaded offline.

    Build with :meth:`from_pretrained` from a directory holding the model's config, weights and tokenizer.
    Prompts are padded/truncated to ``max_len`` tokens; embeddings at padding positions are zeroed.

    Shapes: ``encode(prompts: list[str]) -> (emb [B, max_len, dim] float32, mask [B, max_len] bool)``.
    """

    def __init__(self, tokenizer, model: nn.Module, *, max_len: int = 128) -> None:
        super().__init__()
        check_int("max_len", max_len, minimum=1, who="HFTextEncoder")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        config = model.config
        dim = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
        if not isinstance(dim, int):
            raise ValueError(f"HFTextEncoder: cannot tell the embedding width from config {type(config).__name__}")
        self.dim = dim
        self.max_len = max_len

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        max_len: int = 128,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> HFTextEncoder:
        """Load tokenizer and encoder from the local directory ``path`` (never from the network).

        For T5, mT5 and umT5 checkpoints only the encoder is built and loaded.
        """
        import transformers

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HFTextEncoder.from_pretrained: {path!r} is not a directory")
        dtype = as_dtype("dtype", dtype, who="HFTextEncoder.from_pretrained")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        model_cls_name = _ENCODER_ONLY_CLASSES.get(config.model_type)
        if model_cls_name is not None:
            model_cls = getattr(transformers, model_cls_name)
        elif getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"HFTextEncoder: {config.model_type!r} is an encoder-decoder model without a known encoder-only "
                f"class; supported encoder-decoder families: {sorted(_ENCODER_ONLY_CLASSES)}"
            )
        else:
            model_cls = transformers.AutoModel
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        return cls(tokenizer, model, max_len=max_len)

    @staticmethod
    def checkpoint_problem(path: str | os.PathLike) -> str | None:
        """What keeps :meth:`from_pretrained` from loading ``path`` (``"no config.json in it"``), or ``None``: a
        directory with the model's ``config.json``, its weights and its tokenizer's files."""
        return (
            directory_problem(path)
            or missing_one_of(path, ("config.json",))
            or missing_one_of(path, _HF_WEIGHTS, "weights")
            or missing_one_of(path, _HF_TOKENIZER, "tokenizer files")
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` -> ``(emb [B, max_len, dim] float32, mask [B, max_len] bool)``."""
        prompts = _check_prompts(prompts, "HFTextEncoder.encode")
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        emb = out.last_hidden_state.float() * mask[..., None]
        return emb, mask.bool()

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)
