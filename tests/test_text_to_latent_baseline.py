"""The one-stage text-to-latent baseline (``latent.semantic_tokens = false``): trains, generates, and is refused
where it cannot work."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import TINY, metrics, run_train

from semanticgen.models import LatentGenerator
from semanticgen.train.config import load_config

BASELINE = [
    "--set=stage=latent",
    "--set=latent.semantic_tokens=false",
    "--set=latent.steps=3",
    "--set=semantic.steps=0",
]


def test_baseline_trains_without_semantic_tokens_and_generates(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_train(1, run_dir, *BASELINE)
    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["kl"] == 0.0 for r in recs)  # no compressor in the loss

    seen = []
    real = LatentGenerator.forward

    def spy(self, x, t, text, mask, z_sem):
        seen.append(tuple(z_sem.shape))
        return real(self, x, t, text, mask, z_sem)

    monkeypatch.setattr(LatentGenerator, "forward", spy)
    from semanticgen.runs import build_pipeline_from_run

    pipe = build_pipeline_from_run(run_dir, device="cpu")
    assert pipe.semantic_generator is None and pipe.sem_shape[0] == 0
    frames, mid = pipe(["a red square moving right"], steps=2, seed=0, progress=False, return_intermediates=True)
    assert frames.shape == (1, 17, 3, 32, 32) and torch.isfinite(frames).all()
    assert mid["z_sem"].shape[1] == 0
    assert seen and all(shape[1] == 0 for shape in seen)  # the generator never saw a semantic token


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--set=stage=both"], "no semantic stage"),
        (
            [
                "--set=stage=latent",
                "--set=parallel.context_parallel=2",
                "--set=model.latent_generator.attention=swin",
            ],
            "no context parallelism",
        ),
    ],
)
def test_baseline_config_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, ["latent.semantic_tokens=false", *[o.removeprefix("--set=") for o in overrides]])
