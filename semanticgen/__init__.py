"""semanticgen: fast kernels, models and training for SemanticGen-style two-stage video generation."""

from __future__ import annotations

__version__ = "0.1.0"

from ._extension import extension_available  # noqa: E402

__all__ = ["__version__", "extension_available"]
