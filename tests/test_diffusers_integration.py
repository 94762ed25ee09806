"""Swin attention inside a diffusers WanTransformer3DModel, against the same model with an explicit window mask."""

from __future__ import annotations

import pytest
import torch
from conftest import require_dev_extra

from semanticgen.integrations.diffusers import WanSwinAttnProcessor, _Grid, enable_swin_attention

diffusers = require_dev_extra("diffusers")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402


def tiny_wan(num_layers: int, seed: int = 0) -> torch.nn.Module:
    """Random tiny Wan (2 heads of 12), every parameter redrawn; float64 so the comparison is tight."""
    torch.manual_seed(seed)
    wan = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=64,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wan.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + centre)
    return wan.double()


class MaskedDenseProcessor:
    """diffusers' own WanAttnProcessor, given an explicit boolean ``[1, 1, N, N]`` window mask (True = attend).

    The mask is built here from first principles: token ``n`` is in latent frame ``n // tokens_per_frame``, and
    frame ``f`` in window ``(f + shift) // window`` with ``shift = window // 2`` when shifted, else 0.
    """

    def __init__(self, frames: int, tokens_per_frame: int, window: int, shifted: bool) -> None:
        frame = torch.arange(frames * tokens_per_frame) // tokens_per_frame
        ids = (frame + (window // 2 if shifted else 0)) // window
        self.mask = (ids[:, None] == ids[None, :])[None, None]
        self.inner = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert attention_mask is None
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _run(wan, x, t, text):
    x = x.clone().requires_grad_(True)
    out = wan(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in wan.named_parameters() if p.grad is not None}
    wan.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _inputs(frames: int, h: int = 4, w: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, h, w, generator=g, dtype=torch.float64)
    return x, torch.tensor([300.0, 820.0], dtype=torch.float64), torch.randn(2, 5, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    ("num_layers", "frames", "window"),
    [(2, 6, 2), (3, 7, 4), (3, 5, 3), (2, 2, 4)],  # even/odd depth, ragged last window, a clip within one window
)
def test_swin_matches_explicit_window_mask(num_layers, frames, window):
    wan = tiny_wan(num_layers)
    x, t, text = _inputs(frames)
    tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    full = _run(wan, x, t, text)
    originals = [b.attn1.processor for b in wan.blocks]
    cross = [b.attn2.processor for b in wan.blocks]

    handle = enable_swin_attention(wan, window, backend="cpu")
    for i, block in enumerate(wan.blocks):
        assert isinstance(block.attn1.processor, WanSwinAttnProcessor)
        assert block.attn1.processor.shifted == (i % 2 == 1)
        assert block.attn2.processor is cross[i]  # cross-attention untouched
    swin = _run(wan, x, t, text)
    handle.remove()
    assert [b.attn1.processor for b in wan.blocks] == originals

    for i, block in enumerate(wan.blocks):
        block.attn1.set_processor(MaskedDenseProcessor(frames, tokens_per_frame, window, shifted=i % 2 == 1))
    dense = _run(wan, x, t, text)
    for block, processor in zip(wan.blocks, originals):
        block.attn1.set_processor(processor)

    torch.testing.assert_close(swin[0], dense[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(swin[1], dense[1], rtol=1e-10, atol=1e-10)
    assert swin[2].keys() == dense[2].keys() and len(swin[2]) == len(list(wan.parameters()))
    for name in swin[2]:
        torch.testing.assert_close(swin[2][name], dense[2][name], rtol=1e-10, atol=1e-10, msg=name)

    one_window = frames <= window - window // 2
    assert torch.allclose(swin[0], full[0], rtol=1e-10, atol=1e-10) == one_window
    after = _run(wan, x, t, text)  # removed: the original dense model again
    torch.testing.assert_close(after[0], full[0], rtol=0, atol=0)


def test_swin_bf16_runs_and_tracks_fp32():
    wan = tiny_wan(2)
    x, t, text = _inputs(6)
    handle = enable_swin_attention(wan, 2)
    ref = wan(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    wan.to(torch.bfloat16)
    out = wan(hidden_states=x.bfloat16(), timestep=t.float(), encoder_hidden_states=text.bfloat16(), return_dict=False)[
        0
    ]
    handle.remove()
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.05


def test_enable_swin_attention_rejects_bad_arguments():
    wan = tiny_wan(2)
    for window in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="window must be a positive int"):
            enable_swin_attention(wan, window)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        enable_swin_attention(torch.nn.Linear(2, 2), 4)
    handle = enable_swin_attention(wan, 2)
    with pytest.raises(ValueError, match="already enabled"):
        enable_swin_attention(wan, 4)
    handle.remove()
    handle.remove()  # idempotent
    enable_swin_attention(wan, 4).remove()
    wan.blocks[1].attn1.processor._parallel_config = object()  # what diffusers' enable_parallelism sets
    with pytest.raises(ValueError, match="context parallelism"):
        enable_swin_attention(wan, 4)
    # A block called outside the transformer's forward has no recorded latent grid.
    processor = WanSwinAttnProcessor(_Grid(), 2, shifted=False)
    rope = (torch.ones(1, 6, 1, 12, dtype=torch.float64), torch.zeros(1, 6, 1, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="latent grid"):
        processor(wan.blocks[0].attn1, torch.randn(1, 6, 24, dtype=torch.float64), rotary_emb=rope)
