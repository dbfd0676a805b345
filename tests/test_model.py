"""The SyCoCa towers: output shapes and dtypes, and that no information leaks where it must not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.models import vit
from sycoca_jax.models.sycoca import HEADS, SyCoCa, build_model, init_params
from tests.conftest import tiny_model_config

GEOMETRIES = {
    "cls_pool": {},
    "attn_pool": {"vision.pool": "attn", "vision.attn_pooler_queries": 6, "vision.attn_pooler_heads": 2,
                  "masking.strategy": "random"},
    "wide_text_bf16": {"text.width": 48, "text_decoder.width": 48, "text.heads": 6, "text_decoder.heads": 6,
                       "vision.width": 40, "dtype": "bfloat16", "scan_layers": True, "remat": True},
}


def _batch(cfg, b=3, seed=0):
  rng = np.random.RandomState(seed)
  size, length = cfg.vision.image_size, cfg.text.context_length
  images = rng.randn(b, size, size, 3).astype(np.float32)
  text = np.zeros((b, length), np.int32)
  for i in range(b):
    n = 4 + i
    text[i, 0] = 1
    text[i, 1:n - 1] = rng.randint(3, cfg.text.vocab_size, n - 2)
    text[i, n - 1] = 2
  return jnp.asarray(images), jnp.asarray(text)


def _setup(**overrides):
  cfg = tiny_model_config(**overrides)
  model = build_model(cfg)
  return cfg, model, init_params(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_output_shapes_and_dtypes(name):
  cfg, model, params = _setup(**GEOMETRIES[name])
  images, text = _batch(cfg)
  out = model.apply({"params": params}, images, text, rng=jax.random.PRNGKey(1), heads=HEADS)
  b, n, l = 3, 16, cfg.text.context_length
  assert out["image_embedding"].shape == (b, cfg.embed_dim) and out["image_embedding"].dtype == jnp.float32
  assert out["text_embedding"].shape == (b, cfg.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(out["image_embedding"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["text_embedding"], axis=-1), 1.0, rtol=1e-5)
  assert out["logit_scale"].shape == () and np.isclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  assert out["caption_logits"].shape == (b, l - 1, cfg.text.vocab_size)
  assert out["caption_logits"].dtype == jnp.float32
  assert out["mim_pred"].shape == (b, n, cfg.vision.patch_size ** 2 * 3) and out["mim_pred"].dtype == jnp.float32
  m = out["masks"]
  assert m.ic_keep.shape == (b, n // 2) and m.mim_keep.shape == (b, n // 2) and m.mim_restore.shape == (b, n)
  assert m.mim_mask.shape == (b, n) and np.all(np.asarray(m.mim_mask).sum(1) == n // 2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # parameters stay float32

  image = model.apply({"params": params}, images, method=SyCoCa.encode_image)
  tokens_per_image = 5 if cfg.vision.pool == "attn" else n
  assert image["tokens"].shape[:2] == (b, tokens_per_image)
  compute = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  assert image["tokens"].dtype == compute


def test_open_clip_coca_geometries_build():
  """The towers can express open_clip's coca_ViT-B-32 layout (attn pool, text width != vision width)."""
  cfg, model, params = _setup(**{"vision.pool": "attn", "vision.attn_pooler_queries": 9, "vision.width": 48,
                                 "vision.heads": 6, "embed_dim": 32, "text.width": 32, "text_decoder.width": 32,
                                 "masking.strategy": "random"})
  vision = params["image_encoder"]
  assert vision["attn_pool"]["query"].shape == (9, 32)
  assert vision["proj"].shape == (32, 32)
  assert params["text_encoder"]["positional_embedding"].shape == (cfg.text.context_length + 1, 32)


def test_tg_mim_encoder_ignores_hidden_pixels():
  cfg, model, params = _setup()
  images, text = _batch(cfg)
  out = model.apply({"params": params}, images, text, heads=HEADS)
  hidden = np.asarray(out["masks"].mim_mask)[..., None]  # [B, N, 1]
  patches = np.asarray(vit.patchify(images, cfg.vision.patch_size))
  noisy = patches + hidden * np.random.RandomState(3).randn(*patches.shape).astype(np.float32) * 5
  noisy_images = vit.unpatchify(jnp.asarray(noisy), cfg.vision.patch_size)
  assert not np.allclose(noisy_images, images)

  encode = lambda im: model.apply({"params": params}, im, out["masks"].mim_keep, method=SyCoCa.encode_image)
  np.testing.assert_allclose(encode(images)["tokens"], encode(noisy_images)["tokens"], atol=1e-5)
  # ... whereas the full pass does see them.
  full = lambda im: model.apply({"params": params}, im, method=SyCoCa.encode_image)["tokens"]
  assert not np.allclose(full(images), full(noisy_images), atol=1e-3)


def test_text_is_causal():
  cfg, model, params = _setup()
  images, text = _batch(cfg)
  changed = text.at[:, 3].set((text[:, 3] + 1) % cfg.text.vocab_size)
  enc = lambda t: model.apply({"params": params}, t, method=SyCoCa.encode_text)["tokens"]
  a, b = enc(text), enc(changed)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
  assert not np.allclose(a[:, 3:], b[:, 3:], atol=1e-4)

  image_tokens = model.apply({"params": params}, images, method=SyCoCa.encode_image)["tokens"]
  logits = lambda t: model.apply({"params": params}, image_tokens, t, method=SyCoCa.caption_logits)
  la, lb = logits(text), logits(changed)
  np.testing.assert_allclose(la[:, :3], lb[:, :3], atol=1e-5)  # positions 0..2 predict tokens 1..3
  assert not np.allclose(la[:, 3:], lb[:, 3:], atol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_padding_is_masked(legacy):
  """What a padding token's embedding is must not matter (unless the legacy open_clip mask is asked for)."""
  cfg, model, params = _setup(**{"text.legacy_cls_mask": legacy})
  images, text = _batch(cfg)
  perturbed = jax.tree.map(lambda x: x, params)
  table = perturbed["text_encoder"]["token_embedding"]["embedding"]
  perturbed["text_encoder"]["token_embedding"]["embedding"] = table.at[0].add(3.0)  # pad id 0
  embed = lambda p: model.apply({"params": p}, text, method=SyCoCa.encode_text)["embedding"]
  same = np.allclose(embed(params), embed(perturbed), atol=1e-5)
  assert same != legacy

  # TG-MIM's cross-attention to the caption ignores padding too.
  out = lambda p: model.apply({"params": p}, images, text, heads=("mim",))["mim_pred"]
  if not legacy:
    np.testing.assert_allclose(out(params), out(perturbed), atol=1e-5)


def test_masks_follow_the_caption():
  cfg, model, params = _setup()
  images, text = _batch(cfg)
  other = text.at[:, 1:3].set((text[:, 1:3] + 7) % cfg.text.vocab_size)
  masks = lambda t: model.apply({"params": params}, images, t, heads=HEADS)["masks"]
  assert not np.array_equal(masks(text).scores, masks(other).scores)
  assert not np.array_equal(masks(text).mim_mask, masks(other).mim_mask)


def test_bad_model_config_names_the_key():
  with pytest.raises(ValueError, match=r"config.model.vision.image_size: 30 is not divisible"):
    build_model(tiny_model_config(**{"vision.image_size": 30}))
  with pytest.raises(ValueError, match=r"config.model.masking.mim_ratio"):
    build_model(tiny_model_config(**{"masking.mim_ratio": 1.5}))
  with pytest.raises(ValueError, match=r"config.model.masking.strategy: 'attentive' .*pool='tok'"):
    build_model(tiny_model_config(**{"vision.pool": "attn"}))
