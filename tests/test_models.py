"""Models with tiny configs: shapes, KL, RoPE, windowed vs full attention, masking, gradients.

The forward/backward tests of the generators take ``device`` (tests/conftest.py): ``cpu`` always, ``cuda`` on a GPU
machine, where the same assertions run on the CUDA attention backends (Triton, varlen) and ``torch.compile`` uses
inductor. Inputs and weights are drawn on the CPU and moved, so both devices see the same values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from semanticgen.models import (
    DiTBlock,
    LatentGenerator,
    SemanticCompressor,
    SemanticGenerator,
    SemanticNorm,
    TimestepModulation,
    apply_rope,
    gaussian_kl,
    grid_positions,
    patchify,
    rope_axis_dims,
    rope_tables,
    sincos_position_embedding,
    token_grid,
    unpatchify,
)


def _randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised gates included) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norm gains stay near 1
            p.copy_(torch.randn(p.shape, generator=g) * std + centre)
    return model


def _text(batch: int, length: int, dim: int, valid: int | None = None):
    text = torch.randn(batch, length, dim)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, : length if valid is None else valid] = True
    return text, mask


def _latent_inputs(cfg: LatentGenerator.Config, b=2, t=4, h=4, w=6, ts=2, ss=6, device="cpu"):
    x = torch.randn(b, cfg.in_channels, t, h, w)
    z_sem = torch.randn(b, ts, ss, cfg.sem_dim)
    text, mask = _text(b, 5, cfg.text_dim, valid=3)
    return _to(device, x, torch.rand(b), text, mask, z_sem)


def _to(device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` on ``device`` (the same tensors on the CPU: ``.to`` returns them unchanged)."""
    return tuple(t.to(device) for t in tensors)


def _backend(device: torch.device, cpu: str | None) -> str | None:
    """``swin_backend`` for ``device``: ``cpu`` on the CPU, ``None`` (the fastest CUDA backend) on a GPU."""
    return cpu if device.type == "cpu" else None


# ------------------------------------------------------------------------------------------------ compressor
def test_compressor_shapes_and_kl_matches_closed_form():
    comp = _randomize(SemanticCompressor(SemanticCompressor.Config.tiny()), std=0.3)
    feats = torch.randn(2, 3, 5, comp.config.in_dim) * 4
    out = comp(feats, generator=torch.Generator().manual_seed(1))
    shape = (2, 3, 5, comp.config.dim)
    assert out.z.shape == out.mean.shape == out.logvar.shape == shape
    assert out.kl.shape == ()
    # Closed form against torch.distributions, per dimension, summed over dim and averaged over tokens.
    q = torch.distributions.Normal(out.mean.double(), (0.5 * out.logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))
    expected = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(out.kl.double(), expected, rtol=1e-5, atol=1e-6)


def test_compressor_kl_is_zero_for_standard_normal():
    mean = torch.zeros(4, 8)
    assert gaussian_kl(mean, torch.zeros(4, 8)).abs().max() == 0
    # One dimension with mean 1 and variance e: 0.5 * (1 + e - 1 - 1).
    kl = gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.5 * (math.e - 1)]))


def test_compressor_reparameterisation_and_mean():
    comp = _randomize(SemanticCompressor(SemanticCompressor.Config.tiny()), std=0.3)
    feats = torch.randn(1, 2, 3, comp.config.in_dim)
    out = comp(feats, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(out.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.z, out.mean + (0.5 * out.logvar).exp() * eps)
    torch.testing.assert_close(comp.encode_mean(feats), out.mean)
    assert torch.equal(comp(feats, sample=False).z, out.mean)
    # Gradients reach the encoder through the sample (reparameterisation) and the KL.
    (out.z.sum() + out.kl).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.parameters())


def test_compressor_rejects_bad_input():
    comp = SemanticCompressor(SemanticCompressor.Config.tiny())
    with pytest.raises(ValueError, match="in_dim=32"):
        comp(torch.randn(1, 2, 3, 31))
    with pytest.raises(ValueError, match=r"\[B, Ts, Ss, in_dim\]"):
        comp(torch.randn(2, 3, 32))


# ------------------------------------------------------------------------------------------------ embeddings
def test_patchify_is_frame_major_and_inverts():
    x = torch.randn(2, 3, 4, 6, 8)
    patch = (2, 3, 2)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, 2 * 2 * 4, 3 * 2 * 3 * 2)
    # Token (frame 1, row 1, col 2) holds x[:, :, 2:4, 3:6, 4:6].
    idx = (1 * 2 + 1) * 4 + 2
    torch.testing.assert_close(tokens[:, idx], x[:, :, 2:4, 3:6, 4:6].reshape(2, -1))
    torch.testing.assert_close(unpatchify(tokens, patch, (3, 4, 6, 8)), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 3, 3, 6, 8), patch)


# ------------------------------------------------------------------------------------------------------ rope
@pytest.mark.parametrize("head_dim", [6, 16, 64, 128])
def test_rope_axis_dims_are_even_and_cover_the_head(head_dim):
    dims = rope_axis_dims(head_dim)
    assert sum(dims) == head_dim and all(d % 2 == 0 and d >= 2 for d in dims)


def test_rope_is_relative_and_norm_preserving():
    torch.manual_seed(0)
    d = 24
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq]), d)
        ck, sk = rope_tables(torch.tensor([pk]), d)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    # Fractional positions: only the offset matters, along each axis.
    a = score([0.5, 1.0, 2.0], [2.25, 3.0, 1.0])
    b = score([10.5, -4.0, 7.0], [12.25, -2.0, 6.0])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, score([0.5, 1.0, 2.0], [2.5, 3.0, 1.0]))
    cos, sin = rope_tables(torch.tensor([[3.3, 1.0, -2.0]]), d)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(), q.norm())


def test_token_grid_follows_aspect():
    assert token_grid(12, 1.0) == (3, 4)
    assert token_grid(12, 3 / 4) == (3, 4)
    assert token_grid(12, 4 / 3) == (4, 3)
    assert token_grid(8, 0.5) == (2, 4)
    assert token_grid(7, 1.0) in {(1, 7), (7, 1)}
    assert token_grid(1) == (1, 1)


def test_latent_token_positions_share_the_time_axis():
    tv, rows, cols, ts, ss = 8, 4, 6, 3, 6
    pos = LatentGenerator.token_positions(tv, rows, cols, ts, ss)
    assert pos.shape == (tv * rows * cols + ts * ss, 3)
    torch.testing.assert_close(pos[: tv * rows * cols], grid_positions(tv, rows, cols))
    sem = pos[tv * rows * cols :].reshape(ts, ss, 3)
    for j in range(ts):
        assert torch.all(sem[j, :, 0] == j * tv / ts)  # fractional: 0, 8/3, 16/3
    # Ss = 6 on a 4x6 grid (aspect 2/3) -> 2x3 raster; cell centres on the VAE grid.
    torch.testing.assert_close(sem[0, :, 1].unique(), torch.tensor([0.5, 2.5]))
    torch.testing.assert_close(sem[0, :, 2].unique(), torch.tensor([0.5, 2.5, 4.5]))


# --------------------------------------------------------------------------------------------------- blocks
def test_fresh_block_is_identity():
    block = DiTBlock(DiTBlock.Config(hidden=32, heads=2, mlp_ratio=2.0))
    x = torch.randn(2, 10, 32)
    cos, sin = rope_tables(grid_positions(2, 1, 5), 16)
    text, mask = _text(2, 4, 32)
    time_mod = TimestepModulation(32)(torch.randn(2, 32))  # fresh: all zeros
    assert time_mod.shape == (2, 6, 32)
    torch.testing.assert_close(block(x, time_mod, text, mask, cos, sin), x)
    # A trained modulation opens the gates: the same block is then no longer the identity.
    assert not torch.allclose(block(x, torch.randn(2, 6, 32), text, mask, cos, sin), x)


def test_block_has_no_buffers_and_owns_its_parameters():
    block = DiTBlock(DiTBlock.Config(hidden=32, heads=2))
    assert list(block.buffers()) == []
    assert sum(p.numel() for p in block.parameters()) > 0


# ------------------------------------------------------------------------------------------ semantic generator
def test_semantic_generator_shapes_and_fresh_output_is_zero(device):
    model = SemanticGenerator(SemanticGenerator.Config.tiny()).to(device)
    x = torch.randn(2, 3, 4, model.config.dim)
    text, mask = _text(2, 5, model.config.text_dim)
    x, t, text, mask = _to(device, x, torch.rand(2), text, mask)
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    assert out.abs().max() == 0  # zero-initialised output layer: the first velocity is 0
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == model.config.depth


def test_semantic_generator_masked_text_is_ignored_and_empty_text_is_finite(device):
    model = _randomize(SemanticGenerator(SemanticGenerator.Config.tiny())).to(device)
    x, t = torch.randn(2, 3, 4, model.config.dim), torch.rand(2)
    text, mask = _text(2, 6, model.config.text_dim, valid=2)
    garbage = text.clone()
    garbage[:, 2:] = torch.randn_like(garbage[:, 2:]) * 100
    x, t, text, mask, garbage = _to(device, x, t, text, mask, garbage)
    out = model(x, t, text, mask)
    torch.testing.assert_close(model(x, t, garbage, mask), out)
    empty = model(x, t, text, torch.zeros_like(mask))
    assert torch.isfinite(empty).all()
    assert not torch.allclose(empty, out)  # the prompt matters


def test_semantic_generator_gradients_reach_every_parameter(device):
    model = _randomize(SemanticGenerator(SemanticGenerator.Config.tiny())).to(device)
    x = torch.randn(2, 2, 4, model.config.dim).to(device).requires_grad_(True)
    text, mask = _text(2, 3, model.config.text_dim)
    t, text, mask = _to(device, torch.rand(2), text, mask)
    model(x, t, text, mask).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_semantic_generator_rejects_bad_input():
    model = SemanticGenerator(SemanticGenerator.Config.tiny())
    x = torch.randn(2, 3, 4, model.config.dim)
    text, mask = _text(2, 5, model.config.text_dim)
    with pytest.raises(ValueError, match="dim=4"):
        model(torch.randn(2, 3, 4, 5), torch.rand(2), text, mask)
    with pytest.raises(ValueError, match="one timestep per batch"):
        model(x, torch.rand(3), text, mask)
    with pytest.raises(TypeError, match="bool"):
        model(x, torch.rand(2), text, mask.float())
    with pytest.raises(ValueError, match="text_dim=16"):
        model(x, torch.rand(2), torch.randn(2, 5, 8), mask)


@pytest.mark.parametrize("abs_pos", [True, False])
def test_semantic_generator_absolute_positions_break_the_symmetry_of_identical_tokens(abs_pos):
    """Every token equal (what pure noise looks like to a relative-position model, on average): with RoPE alone the
    outputs are equal too, so stage 1 could not place anything; the absolute embedding makes them differ."""
    cfg = dataclasses.replace(SemanticGenerator.Config.tiny(), abs_pos=abs_pos)
    model = _randomize(SemanticGenerator(cfg))
    x = torch.randn(1, 1, 1, cfg.dim).expand(2, 3, 4, cfg.dim).contiguous()
    text, mask = _text(2, 5, cfg.text_dim)
    out = model(x, torch.rand(2), text, mask).flatten(1, 2)  # [B, tokens, dim]
    spread = (out - out[:, :1]).abs().max()
    if abs_pos:
        assert spread > 1e-2
    else:
        assert spread < 1e-5


def test_semantic_generator_abs_pos_is_on_by_default_and_needs_an_even_width():
    assert SemanticGenerator(SemanticGenerator.Config.tiny()).abs_pos
    cfg = dataclasses.replace(SemanticGenerator.Config.tiny(), hidden=33, heads=3)
    with pytest.raises(ValueError, match="even hidden"):
        SemanticGenerator(cfg)


@pytest.mark.parametrize("abs_pos", [True, False])
def test_latent_generator_without_semantic_tokens_needs_absolute_positions_to_place_anything(abs_pos):
    """The text-to-latent baseline sees no semantic token: identical VAE tokens give identical outputs with RoPE
    alone, different ones with ``abs_pos``."""
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), abs_pos=abs_pos)
    model = _randomize(LatentGenerator(cfg))
    x = torch.randn(1, cfg.in_channels, 1, 1, 1).expand(2, cfg.in_channels, 4, 4, 6).contiguous()
    text, mask = _text(2, 5, cfg.text_dim)
    out = model(x, torch.rand(2), text, mask, torch.zeros(2, 0, 4, cfg.sem_dim))
    tokens = patchify(out, cfg.patch)
    spread = (tokens - tokens[:, :1]).abs().max()
    assert spread > 1e-2 if abs_pos else spread < 1e-5


def test_latent_generator_abs_pos_blocked_order_matches_streams_order(monkeypatch):
    """The embedding is added before the blocked reordering, so both orders give the same model."""
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), abs_pos=True, attention="swin", window=2)
    model = _randomize(LatentGenerator(cfg)).double()
    x, tt, text, mask, z_sem = (a.double() if a.is_floating_point() else a for a in _latent_inputs(cfg, t=6, ts=2))
    blocked = model(x, tt, text, mask, z_sem)
    layout = model.window_layout(6, 2 * 3, 2, 6)
    assert layout.order == "blocked"
    monkeypatch.setattr(model, "window_layout", lambda *shape: layout.with_order("streams"))
    torch.testing.assert_close(model(x, tt, text, mask, z_sem), blocked, rtol=1e-12, atol=1e-12)
    no_pos = LatentGenerator(dataclasses.replace(cfg, abs_pos=False)).double()
    no_pos.load_state_dict(model.state_dict())
    assert (no_pos(x, tt, text, mask, z_sem) - blocked).abs().max() > 1e-3


def test_sincos_position_embedding_uses_the_rope_angles():
    pos = grid_positions(2, 2, 3)
    emb = sincos_position_embedding(pos, 12)
    cos, sin = rope_tables(pos, 12)
    assert emb.shape == (12, 12)
    torch.testing.assert_close(emb[:, 0::2], cos)
    torch.testing.assert_close(emb[:, 1::2], sin)
    assert len({tuple(row.tolist()) for row in emb}) == 12  # every position distinct
    with pytest.raises(ValueError, match="even"):
        sincos_position_embedding(pos, 7)


def test_semantic_norm_inverts_and_rejects_bad_statistics():
    norm = SemanticNorm((0.5, -1.0), (2.0, 0.25))
    z = torch.randn(3, 2, 4, 2)
    torch.testing.assert_close(norm.normalize(z), (z - torch.tensor([0.5, -1.0])) / torch.tensor([2.0, 0.25]))
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    assert SemanticNorm.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    with pytest.raises(ValueError, match="channels"):
        norm.normalize(torch.randn(2, 3))
    for mean, std in (((0.0,), (0.0,)), ((0.0, 1.0), (1.0,)), ((), ()), ((float("nan"),), (1.0,))):
        with pytest.raises(ValueError, match="SemanticNorm"):
            SemanticNorm(mean, std)
    with pytest.raises(ValueError, match="keys 'mean' and 'std'"):
        SemanticNorm.from_dict({"mean": [0.0]})


# -------------------------------------------------------------------------------------------- latent generator
def test_latent_generator_shapes(device):
    for attention in ("full", "swin"):
        cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention=attention)
        model = _randomize(LatentGenerator(cfg)).to(device)
        inputs = _latent_inputs(cfg, device=device)
        out = model(*inputs)
        assert out.shape == inputs[0].shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "patch, depth, window",
    [((1, 2, 2), 1, 4), ((1, 2, 2), 3, 8), ((2, 2, 1), 3, 8)],
    ids=["one-unshifted-layer,Tw=Tv", "3-layers,Tw=2Tv", "patch=2x2x1,3-layers,Tw=2Tv"],
)
def test_latent_generator_swin_equals_full_when_one_window_covers_the_clip(patch, depth, window, device):
    t = 4
    # Unshifted windows start at frame 0: one covers the clip when Tw >= Tv. Shifted windows (odd layers) start
    # at -Tw/2, so there one window covers all Tv frames only when Tw - Tw // 2 >= Tv, e.g. Tw = 2 * Tv.
    base = dataclasses.replace(LatentGenerator.Config.tiny(), patch=patch, depth=depth, window=window)
    full = _randomize(LatentGenerator(dataclasses.replace(base, attention="full")))
    swin = LatentGenerator(dataclasses.replace(base, attention="swin"))
    swin.load_state_dict(full.state_dict())
    full, swin = full.to(device), swin.to(device)
    inputs = _latent_inputs(base, t=t, ts=3, device=device)
    torch.testing.assert_close(swin(*inputs), full(*inputs), rtol=1e-5, atol=1e-5)


def test_latent_generator_small_windows_restrict_attention(device):
    base = dataclasses.replace(LatentGenerator.Config.tiny(), depth=2, window=2)
    full = _randomize(LatentGenerator(dataclasses.replace(base, attention="full")))
    swin = LatentGenerator(dataclasses.replace(base, attention="swin"))
    swin.load_state_dict(full.state_dict())
    full, swin = full.to(device), swin.to(device)
    x, t, text, mask, z_sem = _latent_inputs(base, t=8, ts=4, device=device)
    assert not torch.allclose(swin(x, t, text, mask, z_sem), full(x, t, text, mask, z_sem), atol=1e-4)
    # With one unshifted layer, a change in the last frames cannot reach frame 0 (window of 2 frames).
    one_layer = LatentGenerator(dataclasses.replace(base, attention="swin", depth=1)).to(device)
    one_layer.load_state_dict({k: v for k, v in swin.state_dict().items() if not k.startswith("blocks.1.")})
    x2, z2 = x.clone(), z_sem.clone()
    x2[:, :, 4:] += 1.0
    z2[:, 2:] += 1.0
    a, b = one_layer(x, t, text, mask, z_sem), one_layer(x2, t, text, mask, z2)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])


def test_latent_generator_swin_device_backend_matches_reference_backend(device):
    """The device's own swin backend (CPU: ``cpu``; CUDA: the fastest for fp32, Triton) against ``reference``."""
    base = dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", window=2, depth=2)
    fast = _randomize(LatentGenerator(dataclasses.replace(base, swin_backend=_backend(device, "cpu"))))
    ref = LatentGenerator(dataclasses.replace(base, swin_backend="reference"))
    ref.load_state_dict(fast.state_dict())
    fast, ref = fast.to(device), ref.to(device)
    inputs = _latent_inputs(base, t=6, ts=3, device=device)
    torch.testing.assert_close(fast(*inputs), ref(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, ts, window", [(6, 3, 2), (7, 2, 3), (5, 0, 4), (3, 2, 8)], ids=str)
def test_latent_generator_blocked_order_matches_streams_order(t, ts, window, monkeypatch):
    """Swin mode runs its blocks in blocked token order; output and every parameter gradient equal the
    streams-order path (same layout in streams order, no permutation) to fp64 rounding. CPU only: the ordering is
    device-independent, and no CUDA swin backend but ``reference`` takes fp64."""
    base = dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", window=window, depth=3)
    model = _randomize(LatentGenerator(base)).double()
    x, t_, text, mask, z_sem = (a.double() if a.is_floating_point() else a for a in _latent_inputs(base, t=t, ts=ts))

    def run():
        model.zero_grad()
        out = model(x, t_, text, mask, z_sem)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    blocked_out, blocked_grads = run()
    layout = model.window_layout(t, 2 * 3, ts, 6)  # 4 x 6 latents in 2 x 2 patches, 6 semantic tokens a frame
    assert layout.order == "blocked"
    monkeypatch.setattr(model, "window_layout", lambda *shape: layout.with_order("streams"))
    streams_out, streams_grads = run()
    torch.testing.assert_close(blocked_out, streams_out, rtol=1e-12, atol=1e-12)
    for name, grad in blocked_grads.items():
        torch.testing.assert_close(grad, streams_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("attention", ["full", "swin"])
def test_latent_generator_gradients_reach_every_parameter(attention, device):
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention=attention)
    model = _randomize(LatentGenerator(cfg)).to(device)
    x, t, text, mask, z_sem = _latent_inputs(cfg, device=device)
    z_sem.requires_grad_(True)
    model(x, t, text, mask, z_sem).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert z_sem.grad.abs().sum() > 0  # the semantic tokens condition the output


@pytest.mark.parametrize("attention", ["full", "swin"])
def test_latent_generator_runs_without_semantic_frames(attention, device):
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention=attention)
    model = _randomize(LatentGenerator(cfg)).to(device)
    x, t, text, mask, _ = _latent_inputs(cfg, device=device)
    out = model(x, t, text, mask, torch.randn(2, 0, 6, cfg.sem_dim, device=device))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_latent_generator_empty_text_is_finite(device):
    cfg = LatentGenerator.Config.tiny()
    model = _randomize(LatentGenerator(cfg)).to(device)
    x, t, text, mask, z_sem = _latent_inputs(cfg, device=device)
    assert torch.isfinite(model(x, t, text, torch.zeros_like(mask), z_sem)).all()


def test_latent_generator_rejects_bad_input_and_config():
    cfg = LatentGenerator.Config.tiny()
    model = LatentGenerator(cfg)
    x, t, text, mask, z_sem = _latent_inputs(cfg)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, cfg.in_channels, 4, 5, 6), t, text, mask, z_sem)
    with pytest.raises(ValueError, match="sem_dim=4"):
        model(x, t, text, mask, torch.randn(2, 2, 6, 3))
    with pytest.raises(ValueError, match="Ss >= 1"):
        model(x, t, text, mask, torch.randn(2, 2, 0, 4))
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(2, 3, 4, 4, 6), t, text, mask, z_sem)
    with pytest.raises(ValueError, match="attention"):
        LatentGenerator(dataclasses.replace(cfg, attention="local"))
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        LatentGenerator(dataclasses.replace(cfg, patch=(2, 2, 2), window=3))


@pytest.mark.parametrize(
    "cls, field, value, error, message",
    [
        (LatentGenerator, "window", 2.0, ValueError, "LatentGenerator: window must be a positive int, got 2.0"),
        (LatentGenerator, "depth", True, ValueError, "LatentGenerator: depth must be a positive int, got True"),
        (LatentGenerator, "mlp_ratio", float("nan"), ValueError, "LatentGenerator: mlp_ratio must be"),
        (LatentGenerator, "abs_pos", 1, TypeError, "LatentGenerator: abs_pos must be a bool"),
        (LatentGenerator, "ffn_dim", 0, ValueError, "LatentGenerator: ffn_dim must be a positive int"),
        (SemanticGenerator, "heads", "2", ValueError, "SemanticGenerator: heads must be a positive int"),
        (SemanticGenerator, "qk_norm", 1, TypeError, "SemanticGenerator: qk_norm must be a bool"),
        (SemanticGenerator, "grid_aspect", 0.0, ValueError, "SemanticGenerator: grid_aspect must be"),
        (SemanticCompressor, "hidden", 0, ValueError, "SemanticCompressor: hidden must be a positive int, got 0"),
        (SemanticCompressor, "logvar_max", -40.0, ValueError, "logvar_min must be below logvar_max"),
    ],
)
def test_model_configs_reject_wrong_types_and_values(cls, field, value, error, message):
    """A float window or a bool depth used to build a model (``2.0 % 1 == 0``, ``True == 1``): now each field's kind
    is checked, and the error names the model and the field."""
    cfg = dataclasses.replace(cls.Config.tiny(), **{field: value})
    with pytest.raises(error, match=re.escape(message)):
        cls(cfg)
    cls(dataclasses.replace(cfg, **{field: getattr(cls.Config.tiny(), field)}))  # the tiny value builds


def test_default_configs_build_on_meta_device():
    with torch.device("meta"):
        sem = SemanticGenerator(SemanticGenerator.Config())
        lat = LatentGenerator(LatentGenerator.Config(attention="swin"))
        comp = SemanticCompressor(SemanticCompressor.Config())
    assert len(sem.blocks) == 24 and len(lat.blocks) == 30
    assert sum(p.numel() for p in lat.parameters()) > 1e9
    assert comp.mlp[-1].out_features == 16


def test_latent_generator_torch_compile_fullgraph_swin(device):
    # CPU: aot_eager, dynamo + AOTAutograd tracing (graph breaks, fake kernels, autograd) without inductor's C++
    # build. CUDA: inductor, with the swin op's Triton kernels (triton_op) inside the compiled graph.
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention="swin", swin_backend=_backend(device, "cpu"))
    model = _randomize(LatentGenerator(cfg)).to(device)
    inputs = _latent_inputs(cfg, b=1, device=device)
    eager = model(*inputs)  # builds and caches the window layout of this shape outside the graph
    x = inputs[0].clone().requires_grad_(True)
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    compiled = torch.compile(model, fullgraph=True, backend=backend)(x, *inputs[1:])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    compiled.square().sum().backward()
    x_ref = inputs[0].clone().requires_grad_(True)
    model(x_ref, *inputs[1:]).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["full", "swin"])
def test_latent_generator_bfloat16_tracks_float32(attention, device):
    cfg = dataclasses.replace(LatentGenerator.Config.tiny(), attention=attention)
    model = _randomize(LatentGenerator(cfg)).to(device)
    x, t, text, mask, z_sem = _latent_inputs(cfg, device=device)
    ref = model(x, t, text, mask, z_sem)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        auto = model(x, t, text, mask, z_sem)
    model.to(torch.bfloat16)
    pure = model(x.bfloat16(), t, text.bfloat16(), mask, z_sem.bfloat16())
    assert auto.dtype == pure.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); two blocks of matmuls stay within a few of those.
    for out in (auto, pure):
        assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize(
    "module", ["compressor", "semantic_generator", "latent_generator"], ids=lambda m: f"module={m}"
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"semanticgen.models.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cls", [SemanticCompressor, SemanticGenerator, LatentGenerator], ids=lambda c: c.__name__)
def test_models_hold_parameters_only_and_configs_round_trip(cls):
    model = cls(cls.Config.tiny())
    assert list(model.buffers()) == []  # nothing for FSDP to special-case, nothing stale in checkpoints
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    # Configs survive a JSON round trip (tuples come back as lists).
    values = json.loads(json.dumps(dataclasses.asdict(model.config)))
    rebuilt = cls(cls.Config(**values))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config == cls.Config.tiny()


def test_dit_block_benchmark_flop_model():
    from semanticgen.benchmarks.dit_block import TW, Case, block_flops

    # One window covering the clip on both parities: windowed and full attention do the same FLOPs.
    one = Case(64, 2, vae_frames=TW // 2, vae_tokens_per_frame=16, rows=4, sem_frames=1, sem_tokens_per_frame=4)
    assert block_flops(one, "swin") == block_flops(one, "full")
    # Eight windows: self-attention FLOPs drop 8x on unshifted layers and a little more on shifted ones (seven
    # full windows and two half windows: sum of L^2 is 7.5 L^2 instead of 8 L^2); the matmuls do not change.
    many = Case(64, 2, vae_frames=8 * TW, vae_tokens_per_frame=16, rows=4, sem_frames=8, sem_tokens_per_frame=4)
    (lin_s, attn_s), (lin_f, attn_f) = block_flops(many, "swin"), block_flops(many, "full")
    assert lin_s == lin_f
    n, c, text = many.layout.num_tokens, 64, 64
    cross = 4 * n * (text + 1) * c
    assert attn_f - cross == 4 * n * n * c
    assert 8.0 <= (attn_f - cross) / (attn_s - cross) <= 64 / 7.5


@pytest.mark.parametrize("cls", [SemanticCompressor, SemanticGenerator, LatentGenerator], ids=lambda c: c.__name__)
def test_meta_device_build_then_init_weights_matches_a_fresh_model(cls):
    with torch.device("meta"):
        meta_model = cls(cls.Config.tiny())
    model = meta_model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # to_empty memory is arbitrary: make any parameter init_weights misses fail
    model.init_weights()
    fresh = cls(cls.Config.tiny())
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        ref = fresh_params[name]
        assert torch.isfinite(p).all(), name
        if ref.min() == ref.max():  # deterministic init (zero gates and projections, unit norm gains): identical
            assert torch.equal(p, ref), name
        elif ref.numel() > 16:  # random init: same distribution, different draws
            assert 0.7 < (p.std() / ref.std()).item() < 1.4, name
