"""Evaluation of trained runs: prompt adherence on the synthetic moving shapes (``semanticgen eval``).

Imports one way: this package reads ``data``, ``pipeline``, ``runs`` and ``encoders``; nothing below imports it.
"""

from __future__ import annotations

from .detector import Detection, detect, judge, parse_caption
from .prompt_eval import VOCABULARY, check_run, evaluate_run, sample_prompts, summary_rows

__all__ = [
    "Detection",
    "detect",
    "judge",
    "parse_caption",
    "VOCABULARY",
    "check_run",
    "evaluate_run",
    "sample_prompts",
    "summary_rows",
]
