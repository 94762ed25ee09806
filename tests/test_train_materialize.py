"""``materialize`` with units a checkpoint will fill: no wasted initialisation, and nothing left unfilled unnoticed."""

from __future__ import annotations

import pytest
import torch

from semanticgen.models import LatentGenerator
from semanticgen.train.sharding import check_loaded, init_units, materialize


def _meta_model() -> tuple[LatentGenerator, list]:
    with torch.device("meta"):
        model = LatentGenerator(LatentGenerator.Config.tiny())
    return model, init_units({"latent_generator": model})


def test_loaded_units_are_nan_and_the_others_initialise_as_without_them(monkeypatch):
    full, units = _meta_model()
    materialize(full, units, torch.device("cpu"), seed=0)

    model, units = _meta_model()
    built = []
    from semanticgen.train import sharding

    init = sharding.init_weights
    monkeypatch.setattr(sharding, "init_weights", lambda m: built.append(m) or init(m))
    loaded = frozenset({"latent_generator.blocks.0", "latent_generator.blocks.1"})
    materialize(model, units, torch.device("cpu"), seed=0, loaded=loaded)
    assert len(built) == 1  # only the unit outside the blocks was built and initialised
    reference = dict(full.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            assert torch.isnan(param).all(), name
        else:
            assert torch.equal(param, reference[name]), name  # per-unit seeds: skipping others changes nothing

    with pytest.raises(RuntimeError, match=r"blocks\.0\..* is all NaN after loading"):
        check_loaded(model)
    model.load_state_dict(full.state_dict())
    check_loaded(model)  # every value filled: passes


def test_unknown_loaded_unit_is_an_error():
    model, units = _meta_model()
    with pytest.raises(ValueError, match=r"unknown init units \['latent_generator.blocks.9'\]"):
        materialize(model, units, torch.device("cpu"), seed=0, loaded=frozenset({"latent_generator.blocks.9"}))
