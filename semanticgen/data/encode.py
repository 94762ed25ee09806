"""Turn raw clips (videos + captions) into the tensors the two stages train on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Encoders:
    """The frozen encoders of a run: VAE, semantic encoder and text encoder (see ``semanticgen.encoders``)."""

    vae: Any
    semantic: Any
    text: Any

    @classmethod
    def from_specs(cls, specs: dict[str, dict[str, Any]]) -> Encoders:
        """``{"vae": {...}, "semantic": {...}, "text": {...}}`` -> encoders from ``semanticgen.encoders.build_*``."""
        from semanticgen.encoders import build_semantic_encoder, build_text_encoder, build_vae

        missing = [k for k in ("vae", "semantic", "text") if k not in specs]
        if missing:
            raise ValueError(
                f"encoders: missing table(s) {missing}; expected [encoders.vae], [encoders.semantic], [encoders.text]"
            )
        return cls(
            build_vae(specs["vae"]), build_semantic_encoder(specs["semantic"]), build_text_encoder(specs["text"])
        )

    def to(self, device: torch.device) -> Encoders:
        for enc in (self.vae, self.semantic, self.text):
            if isinstance(enc, torch.nn.Module):
                enc.to(device)
            if hasattr(enc, "device") and not isinstance(enc, torch.nn.Module):
                enc.device = device
        return self

    @torch.no_grad()
    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Raw batch (``vae_video [B, F, 3, H, W]``, ``sem_video [B, Fs, 3, H, W]``, ``caption``) -> encoded batch.

        Returns ``latents [B, C, T', H', W']``, ``sem_features [B, Ts, Ss, d]``, ``text [B, L, D]``,
        ``text_mask [B, L]`` (bool), all float32 on ``device``, and passes ``sample_id``/``skipped`` through.
        """
        latents = self.vae.encode(batch["vae_video"].to(device)).float()
        feats = self.semantic.encode(batch["sem_video"].to(device)).float()
        text, mask = self.text.encode(list(batch["caption"]))
        out = {
            "latents": latents,
            "sem_features": feats,
            "text": text.to(device).float(),
            "text_mask": mask.to(device).bool(),
        }
        for key in ("sample_id", "skipped"):
            if key in batch:
                out[key] = batch[key]
        return out

    @torch.no_grad()
    def null_text(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding ``([L, D], [L])``: what text dropout trains the unconditional branch on."""
        emb, mask = self.text.encode([""])
        return emb[0].to(device).float(), mask[0].to(device).bool()
