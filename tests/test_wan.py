"""Wan 2.1 weight compatibility: generators built from a tiny random diffusers ``WanTransformer3DModel``.

The equivalence tests against diffusers take ``device`` (tests/conftest.py): ``cpu`` always, ``cuda`` on a GPU
machine, where both models run there (ours through the CUDA attention backends) from the same CPU-drawn weights and
inputs. The loading, error and distributed tests are device-independent: CPU only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import require_dev_extra

from semanticgen.models import LatentGenerator, SemanticGenerator
from semanticgen.models.wan import WAN_TEXT_LEN, wan_parameter_map, wan_text_states

diffusers = require_dev_extra("diffusers")

# 2 heads of 18: Wan's RoPE gives h = w = 2 * (18 // 6) = 6 channels and t = 6 (each even, as it asserts).
TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=18,
    in_channels=4,
    out_channels=4,
    text_dim=20,
    freq_dim=256,
    ffn_dim=44,
    num_layers=3,
    cross_attn_norm=True,
    rope_max_seq_len=64,
)


def tiny_wan(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random Wan transformer: every parameter redrawn (zero-initialised ones included), norm gains near 1."""
    torch.manual_seed(seed)
    wan = diffusers.WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wan.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + centre)
    return wan


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    wan = tiny_wan()
    wan.save_pretrained(path)
    return path, wan


def _inputs(wan, b=2, t=3, h=4, w=6, text_len=7, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cfg = wan.config
    x = torch.randn(b, cfg.in_channels, t, h, w, generator=g)
    time = torch.rand(b, generator=g)
    text = torch.randn(b, text_len, cfg.text_dim, generator=g)
    return tuple(v.to(device) for v in (x, time, text, torch.ones(b, text_len, dtype=torch.bool)))


def _on(wan: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``wan`` itself on the CPU; a copy on another device (the module-scoped fixture's model stays on the CPU)."""
    return wan if device.type == "cpu" else copy.deepcopy(wan).to(device)


def _backend(device: torch.device) -> str | None:
    """The swin backend these tests pin on the CPU (``cpu``); on a GPU the fastest one for the dtype (``None``)."""
    return "cpu" if device.type == "cpu" else None


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def test_latent_generator_from_wan_equals_wan_fp32(wan_dir, device):
    path, wan = wan_dir
    wan = _on(wan, device)
    model = LatentGenerator.from_wan(path, sem_dim=8, device=device).eval()
    assert model.config.flavor == "wan" and model.config.depth == 3 and model.config.ffn_dim == 44
    x, t, text, mask = _inputs(wan, device=device)
    z_sem = torch.zeros(x.shape[0], 0, 4, 8, device=device)
    ours = model(x, t, text, mask, z_sem)
    ref = wan(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    assert ours.shape == ref.shape == x.shape
    err = _max_rel(ours, ref)
    print(f"fp32 max relative error vs diffusers: {err:.2e}")
    assert err < 1e-5


def _diffusers_bf16(wan: torch.nn.Module) -> torch.nn.Module:
    """Wan in bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` makes it: its ``_keep_in_fp32_modules`` (time
    embedder, modulation tables, norms) stay float32 (from_pretrained itself needs accelerate for that)."""
    wan = wan.to(torch.bfloat16)
    keep = wan._keep_in_fp32_modules
    for name, p in wan.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return wan


@torch.no_grad()
def test_latent_generator_from_wan_bf16_within_twice_diffusers_error(wan_dir, device):
    path, wan = wan_dir
    wan = _on(wan, device)
    x, t, text, mask = _inputs(wan, seed=2, device=device)
    ref = wan(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    wan_bf16 = _diffusers_bf16(tiny_wan().to(device))
    ref_bf16 = wan_bf16(
        hidden_states=x.bfloat16(), timestep=1000 * t, encoder_hidden_states=text.bfloat16(), return_dict=False
    )[0]
    model = LatentGenerator.from_wan(path, dtype=torch.bfloat16, device=device).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    z_sem = torch.zeros(2, 0, 4, 8, dtype=torch.bfloat16, device=device)
    ours = model(x.bfloat16(), t, text.bfloat16(), mask, z_sem)
    theirs_err, our_err = _max_rel(ref_bf16, ref), _max_rel(ours, ref)
    print(f"bf16 max relative error vs fp32 diffusers: ours {our_err:.2e}, diffusers bf16 {theirs_err:.2e}")
    assert theirs_err > 0 and our_err <= 2 * theirs_err


def test_from_wan_module_and_sharded_dir_load_the_same_tensors(wan_dir, tmp_path):
    path, wan = wan_dir
    sharded = tmp_path / "sharded"
    wan.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = LatentGenerator.from_wan(path)
    b = LatentGenerator.from_wan(sharded)
    c = LatentGenerator.from_wan(wan)
    source = wan.state_dict()
    for name, (wan_name, _) in wan_parameter_map(a).items():
        expected = source[wan_name].reshape(dict(a.named_parameters())[name].shape)
        for m in (a, b, c):
            assert torch.equal(dict(m.named_parameters())[name], expected), name
    # The only parameters Wan does not provide: the semantic-token embedding, initialised like a fresh model's.
    assert set(dict(a.named_parameters())) - set(wan_parameter_map(a)) == {"sem_embed.weight", "sem_embed.bias"}
    assert a.sem_embed.weight.std() > 0 and not torch.equal(a.sem_embed.weight, b.sem_embed.weight)
    # Initialised exactly as a fresh model's: same draws from the same seed (the embedders come first in both).
    torch.manual_seed(7)
    loaded = LatentGenerator.from_wan(path)
    torch.manual_seed(7)
    fresh = LatentGenerator(loaded.config)
    assert torch.equal(loaded.sem_embed.weight, fresh.sem_embed.weight)
    assert torch.equal(loaded.sem_embed.bias, fresh.sem_embed.bias)


@torch.no_grad()
def test_from_wan_semantic_frames_change_the_output_and_swin_runs(wan_dir, device):
    path, wan = wan_dir
    model = LatentGenerator.from_wan(path, sem_dim=8, attention="swin", window=2, device=device).eval()
    full = LatentGenerator.from_wan(path, sem_dim=8, device=device).eval()
    full.sem_embed.load_state_dict(model.sem_embed.state_dict())
    x, t, text, mask = _inputs(wan, t=4, device=device)
    z_sem = torch.randn(2, 2, 3, 8).to(device)
    out = model(x, t, text, mask, z_sem)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, full(x, t, text, mask, z_sem))
    assert not torch.allclose(full(x, t, text, mask, z_sem), full(x, t, text, mask, z_sem[:, :0]))


@torch.no_grad()
def test_from_wan_swin_equals_diffusers_with_swin_processors(wan_dir, device):
    """Our swin mode with no semantic frames is diffusers' Wan with ``enable_swin_attention``: same windows."""
    from semanticgen.integrations.diffusers import enable_swin_attention

    path, wan = wan_dir
    wan = _on(wan, device)
    model = LatentGenerator.from_wan(path, attention="swin", window=2, swin_backend=_backend(device), device=device)
    model = model.eval()
    x, t, text, mask = _inputs(wan, t=5, device=device)
    ours = model(x, t, text, mask, torch.zeros(2, 0, 1, 8, device=device))
    full = wan(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    handle = enable_swin_attention(wan, 2, backend=_backend(device))
    try:
        ref = wan(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    finally:
        handle.remove()
    assert _max_rel(ours, ref) < 1e-5 and _max_rel(ours, full) > 1e-3


def test_wan_flavour_context_parallel_one_rank_equals_forward(wan_dir):
    from semanticgen.parallel import ContextGroup

    model = LatentGenerator.from_wan(wan_dir[0], attention="swin", window=2, swin_backend="cpu").double()
    x, t, text, mask = (v.double() if v.is_floating_point() else v for v in _inputs(wan_dir[1], t=6))
    z_sem = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    cp = ContextGroup(0, 1)
    torch.testing.assert_close(
        model.forward_gathered(x, t, text, mask, z_sem, cp), model(x, t, text, mask, z_sem), rtol=1e-12, atol=1e-12
    )


@torch.no_grad()
def test_wan_flavour_attends_to_padded_text_like_wan(wan_dir, device):
    path, wan = wan_dir
    wan = _on(wan, device)
    model = LatentGenerator.from_wan(path, device=device).eval()
    x, t, text, _ = _inputs(wan, device=device)
    mask = torch.zeros(2, text.shape[1], dtype=torch.bool, device=device)
    mask[0, :3] = mask[1, :5] = True
    padded = wan_text_states(text, mask)
    assert padded.shape == (2, WAN_TEXT_LEN, text.shape[2])
    assert torch.equal(padded[0, :3], text[0, :3]) and not padded[0, 3:].any()
    full_mask = torch.ones(2, WAN_TEXT_LEN, dtype=torch.bool, device=device)
    ours = model(x, t, padded, full_mask, torch.zeros(2, 0, 1, 8, device=device))
    ref = wan(hidden_states=x, timestep=1000 * t, encoder_hidden_states=padded, return_dict=False)[0]
    assert _max_rel(ours, ref) < 1e-5


def test_semantic_generator_from_wan_loads_blocks_and_embedders(wan_dir):
    path, wan = wan_dir
    model = SemanticGenerator.from_wan(path, sem_dim=8)
    assert model.config.flavor == "wan" and model.config.dim == 8
    source = wan.state_dict()
    params = dict(model.named_parameters())
    mapping = wan_parameter_map(model, stem=False, output=False)
    loaded = {n for n in mapping}
    for name, (wan_name, _) in mapping.items():
        assert torch.equal(params[name], source[wan_name].reshape(params[name].shape)), name
    assert {n for n in params if n.startswith("blocks.")} <= loaded
    assert {"t_embed.mlp.0.weight", "t_mod.proj.1.weight", "text_embed.mlp.2.bias", "final.modulation"} <= loaded
    # New: the semantic-token input and output projections, initialised as a fresh SemanticGenerator's.
    assert set(params) - loaded == {"x_embed.weight", "x_embed.bias", "final.linear.weight", "final.linear.bias"}
    assert params["x_embed.weight"].std() > 0 and not params["final.linear.weight"].any()
    torch.manual_seed(7)
    loaded = SemanticGenerator.from_wan(path, sem_dim=8)
    torch.manual_seed(7)
    fresh = SemanticGenerator(loaded.config)
    assert torch.equal(loaded.x_embed.weight, fresh.x_embed.weight)
    assert torch.equal(loaded.x_embed.bias, fresh.x_embed.bias)
    x = torch.randn(2, 3, 6, 8)
    t, text = torch.rand(2), torch.randn(2, 5, wan.config.text_dim)
    v = model(x, t, text, torch.ones(2, 5, dtype=torch.bool))
    assert v.shape == x.shape and not v.any()  # zero output projection
    with torch.no_grad():
        torch.nn.init.normal_(model.final.linear.weight)
    assert model(x, t, text, torch.ones(2, 5, dtype=torch.bool)).abs().sum() > 0


# ------------------------------------------------------------------------------------------------ bad input
def _copy(path, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(path, out)
    return out


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_from_wan_refuses_other_class(wan_dir, tmp_path):
    bad = _copy(wan_dir[0], tmp_path)
    _edit_config(bad, _class_name="CogVideoXTransformer3DModel")
    with pytest.raises(ValueError, match="expected _class_name='WanTransformer3DModel'"):
        LatentGenerator.from_wan(bad)
    # The class is checked before the weights: another model's directory fails on what it is, not on its files.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKLWan' in its config.json, expected"):
        LatentGenerator.from_wan(other)
    (other / "config.json").write_text(json.dumps({"model_type": "umt5"}))  # a transformers config: no class name
    with pytest.raises(ValueError, match="_class_name=None in its config.json"):
        LatentGenerator.from_wan(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        LatentGenerator.from_wan(other)
    # A diffusers pipeline directory (model_index.json, transformer/, vae/ ...): the error names the subfolder.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(wan_dir[0], pipeline / "transformer")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="pass its transformer/ subfolder"):
        LatentGenerator.from_wan(pipeline)


def test_from_wan_refuses_image_to_video(wan_dir, tmp_path):
    bad = _copy(wan_dir[0], tmp_path)
    _edit_config(bad, image_dim=32, added_kv_proj_dim=36)
    with pytest.raises(ValueError, match="image-to-video"):
        LatentGenerator.from_wan(bad)
    i2v = diffusers.WanTransformer3DModel(**{**TINY_WAN, "image_dim": 8, "added_kv_proj_dim": 36})
    with pytest.raises(ValueError, match="image-to-video"):
        SemanticGenerator.from_wan(i2v)


def test_from_wan_names_the_missing_tensor(wan_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(wan_dir[0], tmp_path)
    weights = bad / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["blocks.1.attn2.norm_k.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing tensor 'blocks\.1\.attn2\.norm_k\.weight'"):
        LatentGenerator.from_wan(bad)
    # A sharded checkpoint whose index lists a tensor that no shard holds: the same error, not a KeyError.
    sharded = tmp_path / "sharded"
    wan_dir[1].save_pretrained(sharded, max_shard_size="20KB")
    index = sharded / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = sharded / weight_map["blocks.0.ffn.net.2.bias"]
    state = load_file(shard)
    del state["blocks.0.ffn.net.2.bias"]
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'blocks\.0\.ffn\.net\.2\.bias'"):
        LatentGenerator.from_wan(sharded)


def test_from_wan_names_the_first_mis_shaped_tensor(wan_dir, tmp_path):
    bad = _copy(wan_dir[0], tmp_path)
    _edit_config(bad, ffn_dim=48)  # the checkpoint's FFN is 44 wide
    first = r"tensor 'blocks\.0\.ffn\.net\.0\.proj\.weight' .* shape \[44, 36\], expected \[48, 36\]"
    with pytest.raises(ValueError, match=first):
        LatentGenerator.from_wan(bad)
    bad2 = tmp_path / "fewer"
    shutil.copytree(wan_dir[0], bad2)
    _edit_config(bad2, num_layers=2)  # blocks.2.* would be left over
    with pytest.raises(ValueError, match=r"holds tensor 'blocks\.2\."):
        LatentGenerator.from_wan(bad2)


def test_from_wan_refuses_missing_weights_and_bad_window(wan_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        LatentGenerator.from_wan(empty)
    (empty / "config.json").write_text((wan_dir[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="safetensors"):
        LatentGenerator.from_wan(empty)
    with pytest.raises(TypeError, match="WanTransformer3DModel module"):
        LatentGenerator.from_wan(torch.nn.Linear(2, 2))
    for window in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match="window must be a positive int"):
            LatentGenerator.from_wan(wan_dir[0], attention="swin", window=window)


def test_default_flavour_is_unchanged():
    cfg = LatentGenerator.Config.tiny()
    assert cfg.flavor == "semanticgen"
    names = set(dict(LatentGenerator(cfg).named_parameters()))
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.cross.null_kv" in names
    with pytest.raises(ValueError, match="flavor must be one of"):
        LatentGenerator(LatentGenerator.Config.tiny().__class__(flavor="wan2"))


def test_load_wan_sees_through_checkpoint_wrapped_blocks(wan_dir):
    """Training wraps blocks for activation checkpointing (names gain ``_checkpoint_wrapped_module.``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from semanticgen.models.wan import load_wan

    path, _ = wan_dir
    reference = LatentGenerator.from_wan(path)
    model = LatentGenerator(reference.config)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    assert "_checkpoint_wrapped_module" in next(n for n, _ in model.named_parameters() if n.startswith("blocks."))
    load_wan(model, path)
    model.sem_embed.load_state_dict(reference.sem_embed.state_dict())
    x, t, text, mask = _inputs(wan_dir[1])
    z_sem = torch.randn(2, 1, 3, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, z_sem), reference(x, t, text, mask, z_sem))
    bad = LatentGenerator(dataclasses.replace(reference.config, heads=3))
    with pytest.raises(ValueError, match="the model has heads=3 but .* with heads=2"):
        load_wan(bad, path)


# ------------------------------------------------------------------------------------------- sharded loading
def _sharded_load_worker(rank: int, world: int, store_path: str, wan_path: str, results: dict) -> None:
    """What training does with ``init_from`` (meta build, ``fully_shard``, ``materialize``, ``load_wan``), counting
    every byte materialised in full: the init units ``materialize`` builds one at a time, and the tensor slices
    ``load_wan`` reads."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from semanticgen.models.wan import WanSource, load_wan
    from semanticgen.train import sharding

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        source = WanSource(wan_path)
        known = {f.name for f in dataclasses.fields(LatentGenerator.Config)}
        config = LatentGenerator.Config(**{k: v for k, v in source.generator_config().items() if k in known})
        with torch.device("meta"):
            model = LatentGenerator(config)
        units = sharding.init_units({"latent_generator": model})
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        unit_bytes = []
        init_weights = sharding.init_weights

        def counting_init(module):
            unit_bytes.append(sum(p.numel() * p.element_size() for p in module.parameters()))
            return init_weights(module)

        sharding.init_weights = counting_init
        try:
            sharding.materialize(model, units, torch.device("cpu"), seed=0)
        finally:
            sharding.init_weights = init_weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if not n.startswith("sem_embed."):
                    p.to_local().fill_(float("nan"))  # a parameter the loader skipped stays NaN
        load_wan(model, source)
        local_bytes = {
            n: p.to_local().numel() * p.to_local().element_size()
            for n, p in model.named_parameters()
            if not n.startswith("sem_embed.")
        }
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        results[rank] = dict(full=full, bytes_read=source.bytes_read, local_bytes=local_bytes, unit_bytes=unit_bytes)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_load_wan_into_fsdp_shards_reads_only_own_slices(wan_dir, tmp_path):
    """2 gloo ranks, as training loads ``init_from``: meta build, fully_shard, materialize, load_wan. Every shard
    holds Wan's values; each rank reads from the files only the bytes of its own shards (x_embed's Conv3d weight,
    sharded on its output channels, too); what it holds in full at once is at most one init unit (a block, or the
    embedders and heads), so its peak is its own shards plus less than the checkpoint file, never a full copy."""
    import torch.multiprocessing as mp

    path, _ = wan_dir
    reference = LatentGenerator.from_wan(path)
    results = mp.Manager().dict()
    mp.spawn(_sharded_load_worker, args=(2, str(tmp_path / "store"), str(path), results), nprocs=2, join=True)
    total = sum(p.numel() * 4 for n, p in reference.named_parameters() if not n.startswith("sem_embed."))
    file_bytes = (path / "diffusion_pytorch_model.safetensors").stat().st_size
    block_bytes = sum(p.numel() * 4 for p in reference.blocks[0].parameters())
    for rank in (0, 1):
        res = results[rank]
        for name, p in reference.named_parameters():
            if not name.startswith("sem_embed."):
                assert torch.equal(res["full"][name], p), name
        assert res["bytes_read"] == sum(res["local_bytes"].values()) < 0.6 * total
        # One unit per block, then the rest of the model, each dropped before the next: at most one unit's bytes
        # are held in full at a time, well below the whole model and the checkpoint file.
        assert len(res["unit_bytes"]) == len(reference.blocks) + 1 and block_bytes in res["unit_bytes"]
        assert max(res["unit_bytes"]) < 0.5 * total < file_bytes
    assert results[0]["bytes_read"] + results[1]["bytes_read"] == total


def _cp_worker(rank: int, world: int, store_path: str, wan_path: str, results: dict) -> None:
    import os

    import torch.distributed as dist

    from semanticgen.parallel import ContextGroup

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        model, inputs = _cp_model_and_inputs(wan_path)
        cp = ContextGroup.from_group()
        out = model.forward_gathered(*inputs, cp)
        pred, index = model.forward_context_parallel(*inputs, cp)
        pred.square().sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[name] = g
        results[rank] = dict(out=out, grads=grads)
    finally:
        dist.destroy_process_group()


def _cp_model_and_inputs(wan_path):
    torch.manual_seed(0)
    model = LatentGenerator.from_wan(wan_path, sem_dim=8, attention="swin", window=2, swin_backend="cpu").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 4, 6, generator=g, dtype=torch.float64)
    z_sem = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 20, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    return model, (x, t, text, torch.ones(2, 5, dtype=torch.bool), z_sem)


@pytest.mark.distributed
def test_wan_flavour_context_parallel_two_ranks(wan_dir, tmp_path):
    """The Wan flavour under CP = 2 (gloo): gathered velocity and summed gradients equal one process (fp64)."""
    import torch.multiprocessing as mp

    path = str(wan_dir[0])
    model, inputs = _cp_model_and_inputs(path)
    ref = model(*inputs)
    ref.square().sum().backward()
    results = mp.Manager().dict()
    mp.spawn(_cp_worker, args=(2, str(tmp_path / "store"), path, results), nprocs=2, join=True)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["out"], ref.detach(), rtol=1e-12, atol=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(results[rank]["grads"][name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.distributed
@pytest.mark.slow
def test_training_init_from_wan_two_ranks(tmp_path):
    """``[model.*] init_from`` on 2 gloo ranks (tiny config, tiny random Wan sized to its encoders): both generators
    take Wan's architecture and weights; at lr = 0 the exported generators after 2 steps per stage are Wan's."""
    from _train_helpers import run_train

    from semanticgen.exports import read_export

    wan_path = tmp_path / "wan"
    tiny_wan(seed=3, in_channels=4, out_channels=4, text_dim=32).save_pretrained(wan_path)  # tiny.toml's widths
    run_dir = tmp_path / "run"
    run_train(
        2,
        run_dir,
        f"--set=model.latent_generator={{init_from = '{wan_path}', attention = 'swin', window = 2}}",
        f"--set=model.semantic_generator={{init_from = '{wan_path}', grid_aspect = 1.0}}",
        "--set=latent.steps=2",
        "--set=semantic.steps=2",
        "--set=latent.optim.lr=0.0",
        "--set=semantic.optim.lr=0.0",
    )
    lat = LatentGenerator.from_wan(wan_path, sem_dim=4)
    sem = SemanticGenerator.from_wan(wan_path, sem_dim=4)
    for export, name, model in (("latent", "latent_generator", lat), ("semantic", "semantic_generator", sem)):
        tensors, meta = read_export(run_dir / f"{export}.safetensors")
        config = meta["model_configs"][name]
        assert config["flavor"] == "wan" and config["hidden"] == 36 and config["depth"] == 3 and config["ffn_dim"] == 44
        assert config.get("attention", "swin") == "swin"  # the table's own keys are kept
        spec = type(model)._WAN_LOAD
        loaded = wan_parameter_map(model, stem=spec["stem"], output=spec["output"])
        params = dict(model.named_parameters())
        assert len(loaded) > 60
        for param in loaded:
            assert torch.equal(tensors[f"{name}.{param}"], params[param]), f"{name}.{param}"


def _recipe_stand_ins(root) -> dict[str, str]:
    """Tiny random checkpoints in the recipe's formats: a diffusers Wan 2.1 directory (transformer/, vae/,
    text_encoder/ holding a umT5 encoder and its tokenizer) and a Qwen2.5-VL checkpoint with its video processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        UMT5Config,
        UMT5EncoderModel,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    wan = root / "Wan2.1-T2V-1.3B-Diffusers"
    tiny_wan(seed=4, in_channels=4, out_channels=4, text_dim=16).save_pretrained(wan / "transformer")
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).save_pretrained(wan / "vae")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "square", "blue", "circle", "moving", "right", "left"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = UMT5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    UMT5EncoderModel(config).save_pretrained(wan / "text_encoder")
    fast.save_pretrained(wan / "text_encoder")
    qwen = root / "Qwen2.5-VL-3B-Instruct"
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 24}
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    text = {"hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text.update(num_key_value_heads=1, vocab_size=64, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text)).save_pretrained(qwen)
    Qwen2VLVideoProcessor().save_pretrained(qwen)
    return {"wan": str(wan), "qwen": str(qwen)}


@pytest.mark.distributed
@pytest.mark.slow
def test_wan_recipe_config_trains_two_steps_on_two_ranks(tmp_path):
    """configs/wan2.1_t2v_1.3b_semanticgen.toml end to end on 2 CPU ranks with tiny stand-ins at its paths: only
    the paths, devices, clip size, step counts and torch.compile are overridden."""
    require_dev_extra("torchvision", "transformers' Qwen2-VL video processor needs it")
    from _train_helpers import REPO, metrics, run_train

    from semanticgen.exports import read_export

    paths = _recipe_stand_ins(tmp_path)
    run_dir = tmp_path / "run"
    wan = paths["wan"]
    overrides = [
        f"--set=encoders.vae.path='{wan}'",
        f"--set=encoders.text.path='{wan}/text_encoder'",
        f"--set=encoders.semantic.path='{paths['qwen']}'",
        f"--set=model.latent_generator.init_from='{wan}/transformer'",
        f"--set=model.semantic_generator.init_from='{wan}/transformer'",
        "--set=data.kind='synthetic'",
        "--set=data.height=112",
        "--set=data.width=112",
        "--set=data.vae_frames=5",
        "--set=data.sem_frames=2",
        "--set=data.num_workers=0",
        "--set=parallel.compile=false",
        "--set=latent.steps=2",
        "--set=semantic.steps=2",
    ]
    for enc in ("vae", "semantic", "text"):
        overrides += [f"--set=encoders.{enc}.device='cpu'", f"--set=encoders.{enc}.dtype='float32'"]
    run_train(2, run_dir, *overrides, config=REPO / "configs" / "wan2.1_t2v_1.3b_semanticgen.toml", timeout=600)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    for export, name in (("latent", "latent_generator"), ("semantic", "semantic_generator")):
        _, meta = read_export(run_dir / f"{export}.safetensors")
        config = meta["model_configs"][name]
        assert config["flavor"] == "wan" and config["hidden"] == 36 and config["text_dim"] == 16
    assert meta["config"]["encoders"]["text"]["max_len"] == 512
