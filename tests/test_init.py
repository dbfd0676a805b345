"""Initialisation as open_clip: each kind of weight is drawn with the std open_clip's CoCa towers give it.

open_clip's TextTransformer and MultimodalTransformer (init_parameters), at width w and depth d:
  attention q / k / v  N(0, w ** -0.5)              attention out, MLP c_proj  N(0, w ** -0.5 (2 d) ** -0.5)
  MLP c_fc             N(0, (2 w) ** -0.5)          token embedding 0.02, positions and CLS 0.01
  text_projection      N(0, w ** -0.5)
and its VisionTransformer: conv1 is PyTorch's default Conv2d init, U(+-1 / sqrt(fan_in)) with fan_in = 3 p p;
class and positional embeddings and proj are w ** -0.5 * randn.
"""

import math
import re

import jax
import numpy as np
import pytest

from sycoca_jax import optim
from sycoca_jax.models.sycoca import build_model, init_params
from tests.helpers import tiny_model_config

WIDTH, DEPTH, PATCH = 128, 12, 16


@pytest.fixture(scope="module")
def params():
  # Real init on CPU at a depth where the depth scaling is visible, with every sample above ~2,000 draws;
  # scanned layers keep it quick.
  cfg = tiny_model_config(**{
      "embed_dim": 2 * WIDTH, "scan_layers": True,
      "vision.image_size": 4 * PATCH, "vision.patch_size": PATCH, "vision.width": WIDTH, "vision.heads": 4,
      "text.vocab_size": 512, "text.context_length": 32, "text.width": WIDTH, "text.depth": DEPTH,
      "text.heads": 4, "text_decoder.width": WIDTH, "text_decoder.depth": DEPTH, "text_decoder.heads": 4})
  return init_params(build_model(cfg), jax.random.PRNGKey(0))


def _leaves(params, pattern):
  """Every parameter whose '/'-joined path matches `pattern`, flattened into one sample."""
  paths = jax.tree.leaves(optim.param_paths(params))
  values = jax.tree.leaves(params)
  found = [np.asarray(v).ravel() for p, v in zip(paths, values) if re.search(pattern, p)]
  assert found, f"no parameter matches {pattern}"
  return np.concatenate(found)


def _check_std(sample, expected, name):
  # The std of n normal draws is off by about 1 / sqrt(2 n) relative; allow four of those (and 2 % at least).
  tolerance = max(0.02, 4 / math.sqrt(2 * sample.size))
  std = float(sample.std())
  assert abs(std / expected - 1) < tolerance, f"{name}: std {std:.5f}, open_clip's {expected:.5f}"


attn_std = WIDTH ** -0.5
proj_std = WIDTH ** -0.5 * (2 * DEPTH) ** -0.5
fc_std = (2 * WIDTH) ** -0.5
BLOCKS = {"attn/(query|key|value)/kernel$": attn_std, "attn/out/kernel$": proj_std,
          "mlp/c_fc/kernel$": fc_std, "mlp/c_proj/kernel$": proj_std}


@pytest.mark.parametrize("tower,block", [("text_encoder", "self"), ("text_decoder", "self"),
                                         ("text_decoder", "cross")])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_text_towers_scale_with_depth(params, tower, block, kind):
  _check_std(_leaves(params, f"^{tower}/transformer/layers.*/{block}/{kind}"), BLOCKS[kind], f"{tower} {kind}")


@pytest.mark.parametrize("pattern,expected", [
    ("^text_encoder/token_embedding/embedding$", 0.02),
    ("^text_encoder/positional_embedding$", 0.01),
    ("^text_encoder/text_projection$", WIDTH ** -0.5),
    ("^text_decoder/text_projection$", WIDTH ** -0.5),
    ("^image_encoder/positional_embedding$", WIDTH ** -0.5),
    ("^image_encoder/proj$", WIDTH ** -0.5),
])
def test_embeddings_and_projections(params, pattern, expected):
  _check_std(_leaves(params, pattern), expected, pattern)


def test_patch_embedding_is_pytorch_conv_default(params):
  kernel = _leaves(params, "^image_encoder/conv1/kernel$")
  bound = 1 / math.sqrt(3 * PATCH * PATCH)
  assert kernel.size == 3 * PATCH * PATCH * WIDTH
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound  # uniform over the whole range
  _check_std(kernel, bound / math.sqrt(3), "conv1")
