"""The Wan flavour of the generators' layers, and loading Wan 2.1 (diffusers ``WanTransformer3DModel``) weights.

A generator built with ``flavor="wan"`` computes exactly what Wan 2.1's transformer computes, so a pretrained
Wan checkpoint loads into it tensor for tensor (see :func:`wan_parameter_map`). Where our default blocks differ
from Wan's, the Wan flavour follows Wan:

* self-attention: separate q/k/v projections; q and k RMS-normalised across all heads (one ``RMSNorm(C)``), then
  3-D RoPE (the same t/h/w split of the head dim and adjacent channel pairs as ours);
* cross-attention: separate q/k/v, q/k RMSNorm across heads, an affine LayerNorm on the query input when Wan's
  ``cross_attn_norm`` is set, no learned null token and **no text mask**: Wan pads the umT5 states of a prompt
  with zeros to 512 tokens and attends to all of them (:func:`wan_text_states` builds that input);
* residual updates, the adaLN norms and the modulation in float32 (Wan's ``FP32LayerNorm`` and ``.float()`` casts;
  a float64 model keeps float64);
* output layer: a learned ``[2, C]`` table added to the (un-activated) timestep embedding gives shift and scale;
  the projection's features are ordered (pt, ph, pw, C), reordered here to :func:`patchify`'s (C, pt, ph, pw).

Embedders are already Wan's: the sinusoidal features of ``1000 * t`` (Wan's timestep), a two-layer SiLU MLP, the
shared ``SiLU -> Linear(C, 6C)`` modulation and the two-layer GELU-tanh text projection. Wan's patch embedding is a
``Conv3d`` with kernel = stride = patch; its weight ``[C, Cin, pt, ph, pw]`` flattened is our patch ``Linear``.
Velocity: Wan predicts ``eps - x0``, which is our convention.

Loading: ``LatentGenerator.from_wan`` / ``SemanticGenerator.from_wan`` build a model on the meta device and fill it;
:func:`load_wan` fills an existing (possibly FSDP2-sharded) model, each rank reading only its own slices of the
safetensors files. Text conditioning: the model does not pad; our HF text encoder with ``max_len = 512`` returns
exactly Wan's input (umT5 states zeroed past the prompt), and :func:`wan_text_states` converts other states.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semanticgen._checks import check_int
from semanticgen.ops import WindowLayout, swin_attention

from .blocks import DiTBlock, SplitForward
from .rope import apply_rope

FLAVORS = ("semanticgen", "wan")
WAN_CLASS_NAME = "WanTransformer3DModel"
WAN_TEXT_LEN = 512
"""umT5 context length Wan 2.1 was trained with: prompts are zero-padded to it and attended without a mask."""
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Tensors diffusers itself skips when loading a WanTransformer3DModel (``_keys_to_ignore_on_load_unexpected``).
_IGNORED_SOURCE_KEYS = ("norm_added_q",)


def check_flavor(who: str, flavor: object, qk_norm: bool, cross_attn_norm: bool) -> None:
    """Validate the flavour fields of a generator config."""
    if flavor not in FLAVORS:
        raise ValueError(f"{who}: flavor must be one of {FLAVORS}, got {flavor!r}")
    if flavor == "wan" and not qk_norm:
        raise ValueError(f"{who}: flavor='wan' needs qk_norm=True (Wan always RMS-normalises q and k)")
    if flavor == "semanticgen" and not cross_attn_norm:
        raise ValueError(f"{who}: cross_attn_norm=False exists only for flavor='wan'")


def wan_text_states(text: torch.Tensor, text_mask: torch.Tensor, length: int = WAN_TEXT_LEN) -> torch.Tensor:
    """Text conditioning as Wan 2.1 builds it: states zeroed past the prompt, padded/truncated to ``length`` tokens.

    Wan's pipeline cuts the umT5 states to the prompt's tokens, pads them with zeros to 512 and attends to all 512
    with no mask; a ``flavor="wan"`` generator fed these states (its mask is not used) reproduces that.

    Args:
        text: ``[B, L, D]`` text-encoder states.
        text_mask: ``[B, L]`` bool, True for the prompt's tokens.
        length: tokens of the result (Wan: 512).

    Returns:
        ``[B, length, D]``: ``text`` where the mask is True, zeros elsewhere and past ``L``.
    """
    if text.dim() != 3 or text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
        raise ValueError(
            f"wan_text_states: expected text [B, L, D] and a bool text_mask [B, L], got {tuple(text.shape)} and "
            f"{text_mask.dtype} {tuple(text_mask.shape)}"
        )
    out = text * text_mask[..., None].to(text.dtype)
    if out.shape[1] >= length:
        return out[:, :length]
    return F.pad(out, (0, 0, 0, length - out.shape[1]))


# ----------------------------------------------------------------------------------------------------- layers
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H * D]`` -> ``[B, N, H, D]``."""
    return x.unflatten(-1, (heads, -1))


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, N, H, D]`` q and ``[B, M, H, D]`` k/v -> ``[B, N, H, D]`` (no mask)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class WanSelfAttention(nn.Module):
    """Wan's self-attention: separate q/k/v, q/k RMSNorm across all heads, 3-D RoPE; full or shifted-window.

    Same call as :class:`~semanticgen.models.SelfAttention`: ``x [B, N, C]``, RoPE ``cos/sin [N, D/2]``, an
    optional :class:`~semanticgen.ops.WindowLayout` (or shard) and window parity -> ``[B, N, C]``.
    """

    def __init__(self, hidden: int, heads: int, *, eps: float = 1e-6, swin_backend: str | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"WanSelfAttention: hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = hidden // heads
        self.swin_backend = swin_backend
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.q_norm = nn.RMSNorm(hidden, eps=eps)
        self.k_norm = nn.RMSNorm(hidden, eps=eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: WindowLayout | None = None,
        shifted: bool = False,
    ) -> torch.Tensor:
        q = apply_rope(_split_heads(self.q_norm(self.q(x)), self.heads), cos, sin)
        k = apply_rope(_split_heads(self.k_norm(self.k(x)), self.heads), cos, sin)
        v = _split_heads(self.v(x), self.heads)
        if layout is None:
            out = _dense_attention(q, k, v)
        else:
            out = swin_attention(q, k, v, layout, shifted=shifted, backend=self.swin_backend)
        return self.proj(out.flatten(2))


class WanCrossAttention(nn.Module):
    """Wan's cross-attention to text: separate q/k/v, q/k RMSNorm across heads, attends to every text token.

    ``x [B, N, C]``, ``text [B, L, C]`` (projected) -> ``[B, N, C]``. There is no mask and no null token: Wan
    conditions on umT5 states zero-padded to 512 tokens and attends to the padding too (:func:`wan_text_states`).
    """

    def __init__(self, hidden: int, heads: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"WanCrossAttention: hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.q_norm = nn.RMSNorm(hidden, eps=eps)
        self.k_norm = nn.RMSNorm(hidden, eps=eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = _split_heads(self.q_norm(self.q(x)), self.heads)
        k = _split_heads(self.k_norm(self.k(text)), self.heads)
        v = _split_heads(self.v(text), self.heads)
        return self.proj(_dense_attention(q, k, v).flatten(2))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or wider: Wan's ``.float()`` casts, which would narrow a float64 model (tests) to float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (float64 stays float64) whatever the input dtype, returned so (Wan's norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else _wide(self.weight)
        bias = None if self.bias is None else _wide(self.bias)
        return F.layer_norm(_wide(x), self.normalized_shape, weight, bias, self.eps)


class WanBlock(SplitForward, nn.Module):
    """Wan 2.1's transformer block with :class:`~semanticgen.models.DiTBlock`'s interface (``flavor="wan"``).

    ``x + gate1 * SelfAttn(adaLN(norm1(x)))``, then ``x + CrossAttn(norm2(x), text)``, then
    ``x + gate2 * MLP(adaLN(norm3(x)))``, with the per-block ``[6, C]`` table added to the shared timestep
    modulation. Norms, modulation and residual sums run in float32 (or float64 for a float64 model) and are cast back
    to ``x``'s dtype, as in Wan.
    As for :class:`DiTBlock`, the table and the cross-attention output projection start at zero, and
    :meth:`~semanticgen.models.blocks.SplitForward.forward_split` is shared with it.
    """

    def __init__(self, config: DiTBlock.Config) -> None:
        super().__init__()
        self.config = config
        c = config.hidden
        self.norm1 = _FP32LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = WanSelfAttention(c, config.heads, swin_backend=config.swin_backend)
        self.norm2 = _FP32LayerNorm(c, eps=1e-6) if config.cross_attn_norm else nn.Identity()
        self.cross = WanCrossAttention(c, config.heads)
        self.norm3 = _FP32LayerNorm(c, elementwise_affine=False, eps=1e-6)
        mlp_hidden = config.ffn_dim if config.ffn_dim is not None else int(round(c * config.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(c, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, c))
        self.modulation = nn.Parameter(torch.zeros(6, c))
        self._init_special()

    def init_weights(self) -> None:
        """Re-initialise every parameter of the block (see :func:`~semanticgen.models.init_weights`)."""
        from .init import init_weights

        init_weights(self)

    @torch.no_grad()
    def _init_special(self) -> None:
        nn.init.zeros_(self.modulation)
        nn.init.zeros_(self.cross.proj.weight)
        nn.init.zeros_(self.cross.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: WindowLayout | None = None,
        shifted: bool = False,
    ) -> torch.Tensor:
        """As :meth:`DiTBlock.forward`: ``x [B, N, C]``, ``time_mod [B, 6, C]``, ``text [B, L, C]`` -> ``[B, N, C]``.

        ``text_mask`` is not used: Wan attends to every text token (see :class:`WanCrossAttention`).
        """
        mod = (_wide(self.modulation) + _wide(time_mod)).unsqueeze(2)  # [B, 6, 1, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        h = (self.norm1(x) * (1 + scale1) + shift1).to(x.dtype)
        x = (_wide(x) + self.attn(h, cos, sin, layout, shifted) * gate1).to(x.dtype)
        x = x + self.cross(self.norm2(x).to(x.dtype), text)
        h = (self.norm3(x) * (1 + scale2) + shift2).to(x.dtype)
        return (_wide(x) + _wide(self.mlp(h)) * gate2).to(x.dtype)


class WanFinalLayer(nn.Module):
    """Wan's output layer: ``Linear(norm(x) * (1 + scale) + shift)``, ``(shift, scale) = table + cond``.

    Args:
        hidden: model width ``C``.
        out_features: ``C_out * pt * ph * pw``.
        patch: ``(pt, ph, pw)``: Wan's projection orders its features (pt, ph, pw, C_out); they are reordered to
            :func:`~semanticgen.models.patchify`'s (C_out, pt, ph, pw). ``(1, 1, 1)`` for unpatched tokens.
    """

    def __init__(self, hidden: int, out_features: int, patch: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.patch = tuple(patch)
        if out_features % math.prod(self.patch):
            raise ValueError(f"WanFinalLayer: out_features={out_features} must be divisible by prod({self.patch})")
        self.norm = _FP32LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Parameter(torch.zeros(2, hidden))
        self.linear = nn.Linear(hidden, out_features)
        self._init_special()

    @torch.no_grad()
    def _init_special(self) -> None:
        nn.init.zeros_(self.modulation)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]``, ``cond [B, C]`` (timestep embedding) -> ``[B, N, out_features]``."""
        shift, scale = (_wide(self.modulation) + _wide(cond)[:, None]).unbind(1)  # each [B, C]
        out = self.linear((self.norm(x) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype))
        if self.patch == (1, 1, 1):
            return out
        pt, ph, pw = self.patch
        return out.unflatten(-1, (pt, ph, pw, -1)).permute(0, 1, 5, 2, 3, 4).flatten(2)


# ---------------------------------------------------------------------------------------------------- loading
class WanSource:
    """A Wan transformer's config and tensors, read lazily (one tensor at a time) from a directory or a module.

    Args:
        source: a local diffusers-format ``WanTransformer3DModel`` directory (``config.json`` and
            ``diffusion_pytorch_model.safetensors``, or shards listed in ``...safetensors.index.json``), or a
            ``WanTransformer3DModel`` module.
    """

    def __init__(self, source: str | Path | nn.Module) -> None:
        self._module_state: dict[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        self.bytes_read = 0
        if isinstance(source, nn.Module):
            if type(source).__name__ != WAN_CLASS_NAME or not hasattr(source, "config"):
                raise TypeError(f"from_wan: expected a diffusers {WAN_CLASS_NAME} module, got {type(source).__name__}")
            self.where = f"the {WAN_CLASS_NAME} module"
            self.config = dict(source.config)
            self.config.setdefault("_class_name", WAN_CLASS_NAME)
            self._check_config()
            self._module_state = {k: v.detach() for k, v in source.state_dict().items()}
        elif isinstance(source, (str, Path)):
            root = Path(source)
            self.where = str(root)
            if not root.is_dir():
                raise ValueError(f"from_wan: expected a local diffusers {WAN_CLASS_NAME} directory, got {root!r}")
            config_path = root / "config.json"
            if not config_path.is_file():
                hint = ""
                if (root / "transformer" / "config.json").is_file():
                    hint = f" (a diffusers pipeline directory: pass its transformer/ subfolder, {root / 'transformer'})"
                raise ValueError(f"from_wan: {root} has no config.json; expected a {WAN_CLASS_NAME} directory{hint}")
            try:
                self.config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"from_wan: {config_path} is not valid JSON ({exc})") from exc
            if not isinstance(self.config, dict):
                raise ValueError(f"from_wan: {config_path} holds a {type(self.config).__name__}, expected an object")
            # The class before the weights: a directory of another model fails on what it is, not on its files.
            self._check_config()
            self._files = self._index_files(root)
        else:
            raise TypeError(
                f"from_wan: source must be a directory path or a {WAN_CLASS_NAME} module, got {type(source).__name__}"
            )

    @staticmethod
    def _index_files(root: Path) -> dict[str, Path]:
        from safetensors import safe_open

        index = root / _INDEX_NAME
        single = root / _WEIGHTS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"from_wan: {index} has no 'weight_map' dict")
            files = {key: root / name for key, name in weight_map.items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise ValueError(f"from_wan: {index} lists shard {path.name}, which is not in {root}")
            return files
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        raise ValueError(f"from_wan: {root} has neither {_WEIGHTS_NAME} nor {_INDEX_NAME} (safetensors weights)")

    def _check_config(self) -> None:
        cfg = self.config
        name = cfg.get("_class_name")
        if name != WAN_CLASS_NAME:
            raise ValueError(
                f"from_wan: {self.where} has _class_name={name!r} in its config.json, expected "
                f"_class_name={WAN_CLASS_NAME!r} (a diffusers Wan 2.1 text-to-video transformer)"
            )
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise ValueError(
                f"from_wan: {self.where} is an image-to-video Wan (image_dim={cfg.get('image_dim')}, "
                f"added_kv_proj_dim={cfg.get('added_kv_proj_dim')}); only text-to-video Wan transformers are "
                "supported (image_dim and added_kv_proj_dim null)"
            )
        in_ch, out_ch = cfg.get("in_channels", 16), cfg.get("out_channels", 16)
        if (out_ch or in_ch) != in_ch:
            raise ValueError(f"from_wan: {self.where} has in_channels={in_ch} != out_channels={out_ch}; expected equal")
        for key, expected in (("freq_dim", 256), ("eps", 1e-6)):
            if cfg.get(key, expected) != expected:
                raise ValueError(f"from_wan: {self.where} has {key}={cfg[key]}; only {key}={expected} is supported")

    def generator_config(self) -> dict[str, Any]:
        """The Wan architecture as generator config fields (flavour ``"wan"``); a generator takes those it has."""
        cfg = self.config
        heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
        hidden = heads * head_dim
        ffn_dim = cfg.get("ffn_dim", 13824)
        return {
            "in_channels": cfg.get("in_channels", 16),
            "patch": tuple(cfg.get("patch_size", (1, 2, 2))),
            "hidden": hidden,
            "depth": cfg.get("num_layers", 40),
            "heads": heads,
            "mlp_ratio": ffn_dim / hidden,
            "ffn_dim": ffn_dim,
            "text_dim": cfg.get("text_dim", 4096),
            "qk_norm": True,
            "rope_theta": 10000.0,
            "cross_attn_norm": bool(cfg.get("cross_attn_norm", True)),
            "flavor": "wan",
        }

    def keys(self) -> list[str]:
        return list(self._module_state if self._module_state is not None else self._files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the safetensors headers (no tensor data is read)."""
        if self._module_state is not None:
            return {k: tuple(v.shape) for k, v in self._module_state.items()}
        from safetensors import safe_open

        out: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self._files.values())):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    out[key] = tuple(f.get_slice(key).get_shape())
        return out

    @contextmanager
    def reader(self) -> Iterator[Callable[[str, tuple[slice, ...] | None], torch.Tensor]]:
        """A ``get(key, region)`` that reads tensor ``key``, or only ``region`` of it (one slice per dim).

        Shards are opened once each and read lazily: a region reads just its bytes from the file (safetensors
        slices), so a rank filling its own FSDP shards never holds a full tensor it does not own.
        :attr:`bytes_read` counts what was read from files.
        """
        if self._module_state is not None:
            state = self._module_state
            yield lambda key, region=None: state[key] if region is None else state[key][region]
            return
        from safetensors import safe_open

        handles: dict[Path, Any] = {}
        try:

            def get(key: str, region: tuple[slice, ...] | None = None) -> torch.Tensor:
                path = self._files[key]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt")
                handle = handles[path]
                tensor = handle.get_tensor(key) if region is None else handle.get_slice(key)[region]
                self.bytes_read += tensor.numel() * tensor.element_size()
                return tensor

            yield get
        finally:
            handles.clear()


def _local_region(param: torch.Tensor) -> tuple[slice, ...] | None:
    """The slice of the full parameter this rank holds if ``param`` is a sharded ``DTensor``, else ``None``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _source_region(
    region: tuple[slice, ...], ours: tuple[int, ...], theirs: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """``region`` of our parameter (shape ``ours``) as a region of the Wan tensor (shape ``theirs``), or ``None``
    when it is not one box there (then the whole tensor is read and cut)."""
    if ours == theirs:
        return region
    if theirs == (1, *ours):  # Wan's [1, k, C] tables
        return (slice(None), *region)
    whole_rows = all(r.start == 0 and r.stop == n for r, n in zip(region[1:], ours[1:]))
    if whole_rows and theirs[0] == ours[0]:  # the Conv3d patch weight, sharded by output channel
        return (region[0],) + tuple(slice(None) for _ in theirs[1:])
    return None


def _linear(ours: str, wan: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{wan}.weight"), (f"{ours}.bias", f"{wan}.bias")]


# Name parts that wrappers insert: activation checkpointing (checkpoint_wrapper) and torch.compile (OptimizedModule).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters under their unwrapped names (a checkpointed or compiled block keeps its names)."""
    out = {}
    for name, param in model.named_parameters():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        out[name] = param
    return out


def wan_parameter_map(model: nn.Module, *, stem: bool = True, output: bool = True) -> dict[str, tuple[str, tuple]]:
    """Our parameter name -> ``(Wan tensor name, its shape)`` for a ``flavor="wan"`` generator.

    Args:
        model: a ``flavor="wan"`` :class:`LatentGenerator` or :class:`SemanticGenerator`.
        stem: include the patch embedding (``x_embed`` <- ``patch_embedding``; needs ``model.patch``).
        output: include the output projection (``final.linear`` <- ``proj_out``).

    The output-layer table (``final.modulation``), the embedders and every block are always included; the
    semantic-token embedding (``sem_embed``) never is: Wan has none. Wan's tensors hold our values in our
    layout: its ``[1, k, C]`` tables are our ``[k, C]`` and its ``Conv3d`` patch weight ``[C, Cin, pt, ph, pw]``
    is our patch ``Linear`` ``[C, Cin * pt * ph * pw]`` (both reshapes, no copy of reordered data).
    """
    pairs: list[tuple[str, str]] = []
    if stem:
        pairs += _linear("x_embed", "patch_embedding")
    ce = "condition_embedder"
    pairs += _linear("t_embed.mlp.0", f"{ce}.time_embedder.linear_1")
    pairs += _linear("t_embed.mlp.2", f"{ce}.time_embedder.linear_2")
    pairs += _linear("t_mod.proj.1", f"{ce}.time_proj")
    pairs += _linear("text_embed.mlp.0", f"{ce}.text_embedder.linear_1")
    pairs += _linear("text_embed.mlp.2", f"{ce}.text_embedder.linear_2")
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        for mine, theirs in (("attn", "attn1"), ("cross", "attn2")):
            for proj, wan_proj in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj", "to_out.0")):
                pairs += _linear(f"{b}.{mine}.{proj}", f"{b}.{theirs}.{wan_proj}")
            pairs += [(f"{b}.{mine}.q_norm.weight", f"{b}.{theirs}.norm_q.weight")]
            pairs += [(f"{b}.{mine}.k_norm.weight", f"{b}.{theirs}.norm_k.weight")]
        if model.config.cross_attn_norm:
            pairs += _linear(f"{b}.norm2", f"{b}.norm2")
        pairs += _linear(f"{b}.mlp.0", f"{b}.ffn.net.0.proj")
        pairs += _linear(f"{b}.mlp.2", f"{b}.ffn.net.2")
        pairs += [(f"{b}.modulation", f"{b}.scale_shift_table")]
    pairs += [("final.modulation", "scale_shift_table")]
    if output:
        pairs += _linear("final.linear", "proj_out")
    params = _named_parameters(model)
    out: dict[str, tuple[str, tuple]] = {}
    for ours, wan in pairs:
        shape = tuple(params[ours].shape)
        if ours.endswith("modulation"):
            shape = (1, *shape)
        elif ours == "x_embed.weight":
            shape = (shape[0], shape[1] // math.prod(model.patch), *model.patch)
        out[ours] = (wan, shape)
    return out


@torch.no_grad()
def load_wan_weights(
    model: nn.Module,
    source: WanSource,
    mapping: dict[str, tuple[str, tuple]],
    *,
    new: tuple[str, ...] = (),
    replaced: tuple[str, ...] = (),
) -> None:
    """Fill ``model``'s parameters from ``source`` through ``mapping`` (:func:`wan_parameter_map`), in place.

    Args:
        model: the ``flavor="wan"`` generator to fill.
        source: the Wan checkpoint.
        mapping: our parameter name -> ``(Wan tensor name, expected Wan shape)``.
        new: prefixes of our parameters Wan does not provide (left as initialised).
        replaced: prefixes of Wan tensors this model deliberately does not load (layers it replaces).

    Nothing loads silently with random weights: every parameter of ``model`` is mapped or ``new``; every mapped
    Wan tensor exists with the expected shape; every Wan tensor is used, ``replaced``, or one diffusers itself
    ignores.

    Raises:
        ValueError: naming the first missing or mismatching tensor, or the first unused one.
    """
    params = _named_parameters(model)
    unmapped = [n for n in params if n not in mapping and not n.startswith(new)]
    if unmapped:
        raise ValueError(f"from_wan: parameter {unmapped[0]} has no Wan source and is not new (internal error)")
    available = set(source.keys())
    stored = source.shapes()
    for ours, (wan, shape) in mapping.items():  # every check before any read: a bad checkpoint costs no I/O
        if wan not in available or wan not in stored:  # not listed, or listed by the index but in no shard
            raise ValueError(
                f"from_wan: {source.where} is missing tensor {wan!r} (shape {list(shape)}, for {ours}); "
                f"expected a complete {WAN_CLASS_NAME} checkpoint"
            )
        if stored[wan] != shape:
            raise ValueError(
                f"from_wan: tensor {wan!r} in {source.where} has shape {list(stored[wan])}, expected "
                f"{list(shape)} from its config.json (for {ours})"
            )
    with source.reader() as get:
        for ours, (wan, shape) in mapping.items():
            param = params[ours]
            region = _local_region(param)
            local = param if region is None else param.to_local()
            if region is None:
                value = get(wan).reshape(local.shape)
            else:
                box = _source_region(region, tuple(param.shape), shape)
                value = get(wan, box) if box is not None else get(wan).reshape(param.shape)[region]
            if not value.is_floating_point():
                raise ValueError(f"from_wan: tensor {wan!r} in {source.where} is {value.dtype}, expected floating")
            local.copy_(value.reshape(local.shape))
    used = {wan for wan, _ in mapping.values()}
    extra = sorted(
        k for k in available - used if not any(s in k for s in _IGNORED_SOURCE_KEYS) and not k.startswith(replaced)
    )
    if extra:
        raise ValueError(
            f"from_wan: {source.where} holds tensor {extra[0]!r} ({len(extra)} unexpected in all), which a "
            f"{WAN_CLASS_NAME} with its config.json does not have"
        )


def check_window(window: object) -> None:
    """``window`` must be ``None`` or a positive int (bool is not an int here)."""
    check_int("window", window, minimum=1, allow_none=True, who="from_wan", note="latent frames")


def _wan_spec(model_or_cls) -> dict[str, Any]:
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    spec = getattr(cls, "_WAN_LOAD", None)
    if spec is None:
        raise TypeError(f"Wan weights load into a LatentGenerator or SemanticGenerator, got {cls.__name__}")
    return spec


def load_wan(model: nn.Module, source: str | Path | nn.Module | WanSource) -> WanSource:
    """Fill a ``flavor="wan"`` generator with a Wan checkpoint, in place; its parameters may be FSDP2 shards.

    For a model sharded with ``fully_shard`` (parameters are ``DTensor``), each rank reads only its own slice of
    each tensor from the safetensors files: no rank materialises a full copy of the checkpoint, and the bytes read
    per rank (``WanSource.bytes_read``) are those of its own shards (a shard of the patch embedding or of a
    ``[1, k, C]`` table cut along another dim is read whole and cut). Parameters Wan does not provide (the
    semantic-token projections) are left as they are: initialise the model first.

    Args:
        model: a ``flavor="wan"`` :class:`LatentGenerator` or :class:`SemanticGenerator` whose architecture
            matches the checkpoint's ``config.json``.
        source: a Wan transformer directory, module, or :class:`WanSource`.

    Returns:
        The :class:`WanSource` read (its ``bytes_read`` counts the bytes read from files).

    Raises:
        ValueError: the model's architecture differs from the checkpoint's (the first differing field is named),
            or the checkpoint is not a text-to-video Wan transformer (the first bad tensor is named).
    """
    spec = _wan_spec(model)
    wan = source if isinstance(source, WanSource) else WanSource(source)
    for key, value in wan.generator_config().items():
        if key != "mlp_ratio" and hasattr(model.config, key) and getattr(model.config, key) != value:
            raise ValueError(
                f"load_wan: the model has {key}={getattr(model.config, key)!r} but {wan.where} is a Wan transformer "
                f"with {key}={value!r}"
            )
    mapping = wan_parameter_map(model, stem=spec["stem"], output=spec["output"])
    load_wan_weights(model, wan, mapping, new=spec["new"], replaced=spec["replaced"])
    return wan


def build_from_wan(
    cls: type,
    source: str | Path | nn.Module,
    fields: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A ``flavor="wan"`` generator of class ``cls`` holding the Wan checkpoint ``source``'s weights.

    The model is built on the meta device and materialised once on ``device`` in ``dtype``: no full copy of
    randomly initialised weights is made. Parameters Wan does not provide (``cls._WAN_LOAD["new"]``) are
    initialised as ``cls`` initialises them; everything else is loaded (:func:`load_wan`), and a parameter that is
    neither is an error.
    """
    from .init import init_weights

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_wan: dtype must be a floating torch.dtype or None, got {dtype!r}")
    _wan_spec(cls)
    wan = source if isinstance(source, WanSource) else WanSource(source)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    config = cls.Config(**{k: v for k, v in wan.generator_config().items() if k in known}, **fields)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype or torch.get_default_dtype()).to_empty(device=device or "cpu")
    # Initialise everything outside the blocks as a fresh model does (cheap: no block is touched), so the new
    # parameters get their usual initialisation, then overwrite all that Wan provides. Blocks are entirely Wan's.
    for name, child in model.named_children():
        if name != "blocks":
            init_weights(child)
    load_wan(model, wan)
    return model
