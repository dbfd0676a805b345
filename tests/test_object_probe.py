"""The supervised object probe runs on a runlocal config and learns a label that is plain to see."""

import math

import pytest

from sycoca_jax.tools import object_probe
from tests.helpers import small_train_config


@pytest.mark.slow(reason="80 training steps")
@pytest.mark.parametrize("tower", ["vit", "cnn"])
def test_probe_learns_colour_of_large_objects_on_smooth_backgrounds(tower):
  config = small_train_config(global_batch_size=32)
  config.data.scenes.backgrounds = ("gradient",)
  config.optim.update(lr=3e-3, warmup_steps=5)
  rows = list(object_probe.probe(config, steps=80, label="colour", size="large", every=20, tower=tower))
  assert [r["step"] for r in rows] == [20, 40, 60, 80]
  # Fresh scenes every step, so a falling loss is a held-out one; chance is ln 12 = 2.48 nats.
  assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss"] < math.log(12) - 0.05, rows


def test_probe_names_the_towers_it_knows():
  with pytest.raises(ValueError, match="tower='resnet'.*cnn"):
    next(object_probe.probe(small_train_config(), steps=1, tower="resnet"))
