"""Bridges from other libraries to semanticgen's ops.

* :mod:`semanticgen.integrations.diffusers`: interleaved shifted-window self-attention inside a diffusers
  ``WanTransformer3DModel`` (:func:`~semanticgen.integrations.diffusers.enable_swin_attention`).

Each submodule imports its library lazily, so ``import semanticgen.integrations`` needs none of them.
"""
