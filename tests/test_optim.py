"""The optimizer: the temperature's bounds are kept by the update, not by the forward pass (as open_clip)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sycoca_jax import optim
from sycoca_jax.losses import contrastive_loss
from sycoca_jax.models.sycoca import SyCoCa, build_model
from tests.helpers import tiny_model_config

CAP = math.log(100.0)


def _optimizer(**overrides):
  cfg = optim.default_optim_config()
  cfg.update(lr=1.0, warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0, **overrides)
  return cfg


def _step(cfg, params, grads, frozen=()):
  tx = optim.make_optimizer(cfg, params, optim.schedule(cfg, total_steps=10), frozen=frozen)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_temperature_has_a_gradient_past_the_cap():
  """A logit scale above log 100 must still feel the loss: clamping in the forward pass would zero it for good."""
  model = build_model(tiny_model_config())
  rng = np.random.RandomState(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  image, text = (jnp.asarray(unit(rng.randn(4, 8)).astype(np.float32)) for _ in range(2))

  params = lambda logit_scale: {"params": {"logit_scale": logit_scale, "logit_bias": jnp.float32(0.0)}}

  def loss(logit_scale):
    temperature = model.apply(params(logit_scale), method=SyCoCa.temperature)
    return contrastive_loss(image, text, temperature)

  for value in (CAP + 0.5, CAP - 0.5):
    np.testing.assert_allclose(model.apply(params(jnp.float32(value)), method=SyCoCa.temperature), math.exp(value),
                               rtol=1e-6)
    assert abs(float(jax.grad(loss)(jnp.float32(value)))) > 1e-3


@pytest.mark.parametrize("start,grad,expected", [
    (CAP - 0.01, -1.0, CAP),   # the step would overshoot the cap: it lands on it
    (CAP + 0.5, 0.0, CAP),     # already past (e.g. imported weights): brought back on the first update
    (0.05, 1.0, 0.0),          # the lower bound, 0 (temperature 1)
    (2.0, 1.0, 1.0),           # inside the bounds: AdamW's step of lr = 1, untouched
])
def test_update_lands_logit_scale_inside_its_bounds(start, grad, expected):
  params = {"logit_scale": jnp.float32(start), "w": jnp.ones(3)}
  grads = {"logit_scale": jnp.float32(grad), "w": jnp.full(3, 0.5)}
  new = _step(_optimizer(), params, grads)
  np.testing.assert_allclose(new["logit_scale"], expected, atol=1e-5)
  unbounded = _step(_optimizer(param_bounds=()), params, grads)
  np.testing.assert_array_equal(new["w"], unbounded["w"])  # other leaves: the plain AdamW update
  assert not np.allclose(new["w"], params["w"])


def test_bounds_inside_a_frozen_split():
  """With frozen towers the update goes through optax.multi_transform; the bounds still apply to trainable leaves,
  and a frozen logit scale stays exactly where it is, even out of bounds."""
  params = {"logit_scale": jnp.float32(CAP + 0.5), "w": jnp.ones(3)}
  grads = {"logit_scale": jnp.float32(-1.0), "w": jnp.full(3, 0.5)}
  new = _step(_optimizer(), params, grads, frozen=("^w$",))
  np.testing.assert_allclose(new["logit_scale"], CAP, atol=1e-6)
  np.testing.assert_array_equal(new["w"], params["w"])
  new = _step(_optimizer(), params, grads, frozen=("^logit_scale$",))
  np.testing.assert_array_equal(new["logit_scale"], params["logit_scale"])


@pytest.mark.parametrize("peak,warmup,total,end", [
    (5e-4, 2000, 100_000, 0.0),   # the base config's shape
    (1e-3, 2, 6, 1e-5),           # the tests' tiny runs
    (1e-3, 0, 10, 0.0),           # no warmup
    (2e-3, 100, 3, 0.0),          # warmup longer than the run: cut to total - 1
    (1.0, 5, 1, 0.1),             # a run of one step
])
def test_schedule_is_optax_warmup_cosine_for_numbers_and_traced_arguments(peak, warmup, total, end):
  """The train step takes the schedule's numbers as arguments (one program for any run length); the values are
  optax's warmup_cosine_decay_schedule's, and a traced schedule gives what the numbers give."""
  cut = min(warmup, max(total - 1, 0))
  want = optax.warmup_cosine_decay_schedule(0.0, peak, cut, max(total, cut + 1), end)
  cfg = optim.default_optim_config()
  cfg.update(lr=peak, warmup_steps=warmup, end_lr_fraction=end / peak)
  traced = jax.jit(lambda count, args: optim.warmup_cosine(**args)(count))
  counts = sorted({0, 1, 2, cut - 1, cut, cut + 1, total // 2, total - 1, total, total + 7} - {-1})
  got = [float(optim.schedule(cfg, total)(c)) for c in counts]
  np.testing.assert_allclose(got, [float(want(c)) for c in counts], rtol=2e-5, atol=1e-7 * peak)
  np.testing.assert_allclose([float(traced(c, optim.schedule_args(cfg, total))) for c in counts], got, rtol=1e-6)
  assert got[-1] == pytest.approx(end, rel=1e-5, abs=1e-12) and max(got) == pytest.approx(peak, rel=1e-5)
