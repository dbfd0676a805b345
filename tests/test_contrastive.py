"""The contrastive losses over the device mesh: the ring sigmoid and row-sharded softmax equal the dense formulas,
in value and gradient, and the ring's compiled program never holds a global-batch-sized buffer."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sycoca_jax import config_lib, losses, sharding
from sycoca_jax.models.sycoca import build_model
from tests.helpers import random_batch
from tests.helpers import random_params
from tests.helpers import small_train_config
from tests.helpers import tiny_model_config

B, E = 64, 24   # 8 examples per device on the 8 test devices


def _mesh(data, fsdp):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))


def _embeddings(seed=0):
  rng = np.random.RandomState(seed)
  x, y = rng.randn(2, B, E).astype(np.float32)
  y = x + 0.5 * y   # matching pairs alike, so that the positives matter
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  return unit(x), unit(y)


def _loss_cfg(contrastive, impl="sharded"):
  cfg = losses.default_loss_config()
  cfg.contrastive, cfg.contrastive_impl = contrastive, impl
  return cfg


def _value_and_grads(fn, mesh, x, y, t, b):
  batch = sharding.batch_sharding(mesh)
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(x, y, jnp.float32(t), jnp.float32(b))


def test_sigmoid_loss_matches_numpy():
  x, y = (a[:6].astype(np.float64) for a in _embeddings())
  logits = 10.0 * x @ y.T - 10.0
  labels = 2 * np.eye(6) - 1
  want = np.sum(np.log1p(np.exp(-labels * logits))) / 6
  np.testing.assert_allclose(losses.sigmoid_loss(x, y, 10.0, -10.0), want, rtol=1e-5)


@pytest.mark.parametrize("contrastive", losses.CONTRASTIVE)
@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_losses_and_gradients_equal_the_dense_formula(contrastive, data, fsdp):
  """float32, 1e-5 relative: the ring (sigmoid) and the row-sharded logits (softmax) against the [B, B] formula.

  The bias is far from its initial value so that both label signs weigh in the loss and its gradient."""
  mesh = _mesh(data, fsdp)
  x, y = _embeddings()
  dense = losses.make_contrastive_fn(_loss_cfg(contrastive, "dense"), mesh)
  sharded = losses.make_contrastive_fn(_loss_cfg(contrastive), mesh)
  want = _value_and_grads(dense, mesh, x, y, 7.0, -3.0)
  got = _value_and_grads(sharded, mesh, x, y, 7.0, -3.0)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)
  if contrastive == "softmax":  # the dense softmax is today's loss, blind to the bias
    np.testing.assert_allclose(want[0], losses.contrastive_loss(x, y, 7.0), rtol=1e-6)
    assert float(got[1][3]) == 0.0


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_twin_columns_loss_equals_the_dense_formula(data, fsdp):
  mesh = _mesh(data, fsdp)
  x, y = _embeddings()
  n = _embeddings(seed=1)[1]
  valid = np.arange(B) % 3 != 0
  batch = sharding.batch_sharding(mesh)
  args = [jax.device_put(a, batch) for a in (x, y, n)] + [jnp.float32(7.0), jax.device_put(valid, batch)]
  grads = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)
  want, got = grads(losses.twin_columns_loss), grads(losses.sharded_twin_columns_loss(mesh))
  assert float(want[0]) > 0.1
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


def test_twin_columns_term_of_the_loss_is_the_same_over_the_mesh():
  """make_loss_fn with twin_columns_weight: the term of the row-sharded loss over 8 devices equals the dense one, and
  enters the total with its weight."""
  cfg = tiny_model_config()
  model = build_model(cfg)
  images, text = random_batch(cfg, b=8)
  twins = text.at[1:, 1].set(text[1:, 1] % (cfg.text.vocab_size - 3) + 3)  # another word; row 0: no twin
  batch = {"image": images, "text": text, "hard_negative": twins}
  loss_cfg = losses.default_loss_config()
  loss_cfg.twin_columns_weight = 0.5
  mesh = _mesh(8, 1)
  params, rng = random_params(model), jax.random.PRNGKey(0)
  _, dense = jax.jit(losses.make_loss_fn(model, loss_cfg))(params, batch, rng)
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  _, sharded = jax.jit(losses.make_loss_fn(model, loss_cfg, mesh))(params, sharded_batch, rng)
  assert int(dense["hard_negatives"]) == 7 and float(dense["twin_columns_loss"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, dense)
  without = {k: v for k, v in dense.items() if k not in ("loss", "twin_columns_loss")}
  np.testing.assert_allclose(dense["loss"], losses.total_loss(without, loss_cfg) + 0.5 * dense["twin_columns_loss"],
                             rtol=1e-6)


def _shapes(hlo_text):
  return {tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"[fs]32\[([\d,]*)\]", hlo_text)}


@pytest.mark.parametrize("contrastive", losses.CONTRASTIVE)
def test_compiled_program_holds_no_B_by_B_buffer(contrastive):
  """Per-device shapes of the compiled forward + backward: the ring touches nothing of the global batch's size,
  the sharded softmax only its [b, B] rows (and [B] column statistics), never [B, B]."""
  mesh = _mesh(8, 1)
  x, y = _embeddings()
  fn = losses.make_contrastive_fn(_loss_cfg(contrastive), mesh)
  batch = sharding.batch_sharding(mesh)
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(
      jax.device_put(x, batch), jax.device_put(y, batch), jnp.float32(1.0), jnp.float32(0.0)).compile()
  shapes = _shapes(compiled.as_text())
  b = B // 8
  assert all(s.count(B) <= 1 for s in shapes), sorted(shapes)
  if contrastive == "sigmoid":
    assert (b, b) in shapes and not any(B in s for s in shapes), sorted(shapes)
  else:
    assert (b, B) in shapes, sorted(shapes)


def test_bad_contrastive_option_fails_naming_the_key():
  config = small_train_config()
  config.loss.contrastive = "sigmod"
  with pytest.raises(ValueError, match=r"config.loss.contrastive: 'sigmod' is not one of 'softmax', 'sigmoid'"):
    config_lib.validate(config, 8)
  config.loss.contrastive, config.loss.contrastive_impl = "sigmoid", "ring"
  with pytest.raises(ValueError, match=r"config.loss.contrastive_impl: 'ring'"):
    config_lib.validate(config, 8)
