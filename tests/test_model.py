"""The SyCoCa towers: output shapes and dtypes, and that no information leaks where it must not."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sycoca_jax.models import layers
from sycoca_jax.models import masking as masking_lib
from sycoca_jax.models import vit
from sycoca_jax.models.sycoca import HEADS, OPTIONAL_HEADS, SyCoCa, build_model, init_params
from tests.helpers import random_batch
from tests.helpers import random_params
from tests.helpers import tiny_model_config

GEOMETRIES = {
    "cls_pool": {},
    "attn_pool": {"vision.pool": "attn", "vision.attn_pooler_queries": 6, "vision.attn_pooler_heads": 2,
                  "masking.strategy": "random"},
    "wide_text_bf16": {"text.width": 48, "text_decoder.width": 48, "text.heads": 6, "text_decoder.heads": 6,
                       "vision.width": 40, "dtype": "bfloat16", "scan_layers": True, "remat": True},
}


# Keys that change what the model computes but not its parameters: geometries that differ only in these share
# one initialisation.
PARAMETER_FREE = ("masking.score", "masking.end_token", "text.legacy_cls_mask")


def _setup(init=False, **overrides):
  """(config, model, params) of the tiny geometry with `overrides`: random parameters drawn on the host
  (helpers.random_params), or with init=True the model's own initialisation, compiled and run. Each parameter
  geometry is drawn or initialised once per test process (tracing the whole model takes a second or two); every
  test gets its own copies of the config and of the parameter dicts, so none can change what another sees."""
  params = _initialised(tuple(sorted((k, v) for k, v in overrides.items() if k not in PARAMETER_FREE)), init)
  cfg = tiny_model_config(**overrides)
  return cfg, build_model(cfg), jax.tree.map(lambda x: x, params)


def _jit_apply(model, **kwargs):
  """(params, *args) -> model.apply with `kwargs`, jitted: one program (read back from the persistent cache when
  warm) instead of the hundreds of op-by-op dispatches an eager forward pass makes."""
  return jax.jit(lambda params, *args: model.apply({"params": params}, *args, **kwargs))


@functools.cache
def _initialised(overrides, init):
  model = build_model(tiny_model_config(**dict(overrides)))
  # What these tests check holds for any weights; the draws skip compiling and loading each geometry's init program.
  return init_params(model, jax.random.PRNGKey(0)) if init else jax.tree.map(jnp.asarray, random_params(model))


@pytest.mark.slow(reason="builds and runs each model geometry, bf16 and scanned included")
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_output_shapes_and_dtypes(name):
  cfg, model, params = _setup(init=True, **GEOMETRIES[name])  # each geometry's own initialisation runs too
  images, text = random_batch(cfg)
  out = _jit_apply(model, rng=jax.random.PRNGKey(1), heads=HEADS)(params, images, text)
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

  image = _jit_apply(model, method=SyCoCa.encode_image)(params, images)
  tokens_per_image = 5 if cfg.vision.pool == "attn" else n
  assert image["tokens"].shape[:2] == (b, tokens_per_image)
  compute = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  assert image["tokens"].dtype == compute


def test_bf16_heads_are_float32_from_the_matmul():
  """Under bf16 the vocabulary logits and the pixel predictions come out of their matmul in float32: as close to
  an f32 product of the same bf16 features as accumulation order allows, far closer than the bf16-rounded product
  the loss used to get."""
  cfg, model, params = _setup(**GEOMETRIES["wide_text_bf16"])
  images, text = random_batch(cfg)
  out, state = _jit_apply(model, heads=HEADS, capture_intermediates=True, mutable=["intermediates"])(
      params, images, text)
  features = lambda tower: state["intermediates"][tower]["ln_final"]["__call__"][0]  # the head's input
  # Operands as the model feeds them (bf16 features, weights cast to bf16), multiplied exactly in f32.
  f32 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  product = lambda x, w: np.asarray(jnp.matmul(f32(x), f32(w), precision="highest"))
  pred = params["image_decoder"]["pred"]
  references = {
      "caption_logits": product(features("text_decoder"), params["text_decoder"]["text_projection"]),
      "mim_pred": product(features("image_decoder"), pred["kernel"]) + np.asarray(f32(pred["bias"])),
  }
  assert features("text_decoder").dtype == features("image_decoder").dtype == jnp.bfloat16
  for name, reference in references.items():
    assert out[name].dtype == jnp.float32
    bf16_error = np.abs(np.asarray(f32(reference)) - reference).max()
    assert np.abs(np.asarray(out[name]) - reference).max() < bf16_error / 20, name

  # In the program itself: the vocabulary head's dot takes bf16 operands and produces f32.
  lowered = jax.jit(lambda p: model.apply({"params": p}, images, text, heads=("ic",))).lower(params).as_text()
  logits_type = f"tensor<3x{cfg.text.context_length - 1}x{cfg.text.vocab_size}xf32>"
  assert re.search(rf"dot_general.*tensor<[^>]*xbf16>.*-> {logits_type}", lowered)


def test_open_clip_coca_geometries_build():
  """The towers can express open_clip's coca_ViT-B-32 layout (attn pool, text width != vision width)."""
  cfg, model, params = _setup(**{"vision.pool": "attn", "vision.attn_pooler_queries": 9, "vision.width": 48,
                                 "vision.heads": 6, "embed_dim": 32, "text.width": 32, "text_decoder.width": 32,
                                 "masking.strategy": "random"})
  vision = params["image_encoder"]
  assert vision["attn_pool"]["query"].shape == (9, 32)
  assert vision["proj"].shape == (32, 32)
  assert params["text_encoder"]["positional_embedding"].shape == (cfg.text.context_length + 1, 32)


# Every stem, at widths that compile in seconds.
STEMS = {"linear": {"vision.stem": "linear"},
         "patch_cnn": {"vision.stem": "patch_cnn", "vision.stem_channels": (4, 4, 8, 8, 8)},
         "conv": {"vision.stem": "conv", "vision.stem_channels": (4, 4, 8, 8, 8)},
         "conv_instance_norm_s2d": {"vision.stem": "conv", "vision.stem_channels": (4, 4, 8, 8, 8),
                                    "vision.stem_norm": "instance", "vision.stem_space_to_depth": 2,
                                    "vision.registers": 2}}


@pytest.mark.slow(reason="three full forward passes of the model per stem and strategy")
@pytest.mark.parametrize("strategy", ["attentive", "random"])
@pytest.mark.parametrize("stem", sorted(STEMS))
def test_tg_mim_encoder_ignores_hidden_pixels(stem, strategy):
  """Changing the hidden patches' pixels leaves every output of the TG-MIM encoder pass bit-identical."""
  assert {s["vision.stem"] for s in STEMS.values()} == set(vit.STEMS)  # every stem is covered
  cfg, model, params = _setup(**{"masking.strategy": strategy, **STEMS[stem]})
  images, text = random_batch(cfg)
  # The masks are chosen before any head runs: the TG-MIM head alone gets the same ones, and compiles faster.
  masks = _jit_apply(model, rng=jax.random.PRNGKey(1), heads=("mim",))(params, images, text)["masks"]
  hidden = np.asarray(masks.mim_mask)[..., None]  # [B, N, 1]
  patches = np.asarray(vit.patchify(images, cfg.vision.patch_size))
  noisy = patches + hidden * np.random.RandomState(3).randn(*patches.shape).astype(np.float32) * 5
  noisy_images = vit.unpatchify(jnp.asarray(noisy), cfg.vision.patch_size)
  assert not np.allclose(noisy_images, images)

  encode = lambda im: _jit_apply(model, method=SyCoCa.encode_image)(params, im, masks.mim_keep)
  jax.tree.map(np.testing.assert_array_equal, encode(images), encode(noisy_images))
  # ... whereas the full pass does see them.
  full = lambda im: _jit_apply(model, method=SyCoCa.encode_image)(params, im)["tokens"]
  assert not np.allclose(full(images), full(noisy_images), atol=1e-3)


def test_patch_cnn_tokens_see_their_own_patch_only():
  """A patch_cnn token is a function of its own patch: changing one patch changes that token alone."""
  cfg, model, params = _setup(**STEMS["patch_cnn"])
  images, _ = random_batch(cfg)
  stem = jax.jit(lambda im: model.image_encoder.apply({"params": params["image_encoder"]}, im,
                                                      method=lambda m, x: m.patch_cnn(
                                                          vit.patchify(x, 8).reshape(x.shape[0], -1, 8, 8, 3))))
  changed = images.at[:, 8:16, 16:24].add(3.0)  # patch (1, 2) of the 4 x 4 grid
  differs = np.abs(np.asarray(stem(images) - stem(changed))).max(axis=(0, 2)) > 0  # [N]
  assert differs.tolist() == [i == 6 for i in range(16)]


def test_conv_stem_pools_to_the_patch_grid_and_sees_across_patch_borders():
  assert [vit.pool_factors(p) for p in (6, 8, 14, 16, 18)] == [(2, 3), (2, 2, 2), (2, 7), (2, 2, 2, 2), (2, 3, 3)]
  assert vit.conv_groups(5, 2) == [2, 2, 1] and vit.conv_groups(5, 3) == [2, 1, 1, 1]
  # One convolution per resolution: a token's kernels reach 1 + 2 + 4 = 7 px past its 8 px patch on each side.
  cfg, model, params = _setup(**{"vision.stem": "conv", "vision.stem_channels": (4, 4, 4)})
  images, _ = random_batch(cfg)
  stem = jax.jit(lambda im: model.image_encoder.apply({"params": params["image_encoder"]}, im,
                                                      method=lambda m, x: m.conv_stem(x)))
  assert stem(images).shape == (images.shape[0], 16, cfg.vision.width)
  changed = images.at[:, 8:16, 16:24].add(3.0)  # patch (1, 2) of the 4 x 4 grid
  differs = np.abs(np.asarray(stem(images) - stem(changed))).max(axis=(0, 2)) > 0  # [N]
  # Unlike patch_cnn's, its own token and its eight neighbours' change.
  neighbours = {r * 4 + c for r in (0, 1, 2) for c in (1, 2, 3)}
  assert differs.tolist() == [i in neighbours for i in range(16)]


def test_registers_are_tokens_no_output_reads():
  """vision.registers: the patch embeddings are still one per patch, and the registers take part in attention."""
  cfg, model, params = _setup(**{"vision.pool": "gap", "vision.registers": 3})
  assert params["image_encoder"]["registers"].shape == (3, cfg.vision.width)
  images, _ = random_batch(cfg)
  encode = _jit_apply(model, method=SyCoCa.encode_image)
  out = encode(params, images)
  assert out["patch_embeddings"].shape == (images.shape[0], model.image_encoder.num_patches, cfg.embed_dim)
  np.testing.assert_allclose(out["pooled"], out["patch_embeddings"].mean(axis=1), rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda x: x, params)
  # A random change (a constant shift would vanish in ln_pre).
  moved["image_encoder"]["registers"] = params["image_encoder"]["registers"] + np.random.RandomState(0).randn(
      3, cfg.vision.width).astype(np.float32)
  assert not np.allclose(encode(moved, images)["patch_embeddings"], out["patch_embeddings"], atol=1e-4)


@pytest.mark.parametrize("pool", ["gap", "max"])
def test_pooling_over_patch_tokens(pool):
  """gap: the pooled embedding is the mean of the patch embeddings attentive masking scores; max: the patch
  tokens' channel-wise max, projected."""
  cfg, model, params = _setup(**{"vision.pool": pool})
  images, _ = random_batch(cfg)
  out = _jit_apply(model, method=SyCoCa.encode_image)(params, images)
  if pool == "gap":
    np.testing.assert_allclose(out["pooled"], out["patch_embeddings"].mean(axis=1), rtol=1e-5, atol=1e-6)
  else:
    proj = params["image_encoder"]["proj"]
    np.testing.assert_allclose(out["pooled"], out["tokens"].max(axis=1) @ proj, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("score", ["tokens", "caption", "words"])
def test_attentive_scores_compare_patches_with_the_caption(score):
  """masking.score: 'tokens' (the paper's) takes each patch's best cosine over the caption's word tokens;
  'caption' its cosine with the caption's global embedding; 'words' the sum of its caption-words head logits
  for the caption's tokens, whose mean over the patches is the image's (mean pooling)."""
  words = {"vision.pool": "gap", "words_head": True} if score == "words" else {}
  cfg, model, params = _setup(**{"masking.score": score, **words})
  images, text = random_batch(cfg)
  out = _jit_apply(model, rng=jax.random.PRNGKey(1), heads=HEADS + OPTIONAL_HEADS * bool(words))(params, images, text)
  image = _jit_apply(model, method=SyCoCa.encode_image)(params, images)
  caption = _jit_apply(model, method=SyCoCa.encode_text)(params, text)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  patches = unit(np.asarray(image["patch_embeddings"], np.float64))
  valid = (np.asarray(text) != cfg.pad_id) & (np.arange(text.shape[1]) > 0)
  if score == "words":
    kernel, bias = (np.asarray(params["word_head"][k], np.float64) for k in ("kernel", "bias"))
    raw = np.asarray(image["patch_embeddings"], np.float64)
    expected = np.stack([raw[b] @ kernel[:, np.asarray(text[b])[valid[b]]].sum(1) for b in range(len(raw))])
    logits = _jit_apply(model, heads=("words",))(params, images, text)["word_logits"]
    caption_logits = np.stack([np.asarray(logits[b], np.float64)[np.asarray(text[b])[valid[b]]].sum()
                               for b in range(len(raw))])
    np.testing.assert_allclose(expected.mean(1) + [bias[np.asarray(text[b])[valid[b]]].sum() for b in
                                                   range(len(raw))], caption_logits, rtol=1e-4, atol=1e-4)
  elif score == "caption":
    expected = np.einsum("bne,be->bn", patches, unit(np.asarray(caption["pooled"], np.float64)))
  else:
    sim = np.einsum("bne,ble->bnl", patches, unit(np.asarray(caption["token_embeddings"], np.float64)))
    expected = np.where(valid[:, None], sim, -np.inf).max(-1)
  np.testing.assert_allclose(out["masks"].scores, expected, atol=1e-5)


def test_words_pool_max_takes_each_words_best_patch():
  """model.words_pool='max': the head reads every patch embedding; a word's image logit is its best patch's."""
  cfg, model, params = _setup(**{"vision.pool": "gap", "words_head": True, "words_pool": "max"})
  images, text = random_batch(cfg)
  logits = np.asarray(_jit_apply(model, heads=("words",))(params, images, text)["word_logits"], np.float64)
  patches = np.asarray(_jit_apply(model, method=SyCoCa.encode_image)(params, images)["patch_embeddings"], np.float64)
  kernel, bias = (np.asarray(params["word_head"][k], np.float64) for k in ("kernel", "bias"))
  per_patch = patches @ kernel + bias                                          # [B, N, V]
  np.testing.assert_allclose(logits, per_patch.max(1), rtol=1e-4, atol=1e-4)
  assert not np.allclose(logits, per_patch.mean(1), atol=1e-2)   # not the mean-pooled head's


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_words_grad_centred_keeps_the_logits_and_takes_the_batch_mean_out_of_the_towers_gradient(pool):
  """model.words_grad='centred': the same logits; the gradient reaching the embeddings the head reads sums to zero
  over the batch (and patches), so a loss that asks every image for the same words teaches the tower nothing."""
  overrides = {"vision.pool": "gap", "words_head": True, "words_pool": pool}
  cfg, model, params = _setup(**overrides)
  centred = build_model(tiny_model_config(**overrides, words_grad="centred"))
  images, _ = random_batch(cfg)
  image_out = _jit_apply(model, method=SyCoCa.encode_image)(params, images)
  read = "patch_embeddings" if pool == "max" else "pooled"
  weights = jax.random.normal(jax.random.PRNGKey(1), (images.shape[0], cfg.text.vocab_size))

  def grads(m, per_image):
    # (d loss / d the embeddings the head reads, d loss / d params) for loss = sum(word_logits * w).
    w = weights if per_image else weights[:1]
    def loss(features, p):
      logits = m.apply({"params": p}, {**image_out, read: features}, method=SyCoCa._word_logits)
      return (logits * w).sum()
    return jax.grad(loss, argnums=(0, 1))(image_out[read], params)

  np.testing.assert_array_equal(
      model.apply({"params": params}, images, method=SyCoCa.word_logits),
      centred.apply({"params": params}, images, method=SyCoCa.word_logits))
  full_features, full_params = grads(model, True)
  centred_features, centred_params = grads(centred, True)
  axes = tuple(range(full_features.ndim - 1))
  np.testing.assert_allclose(np.asarray(centred_features).sum(axes), 0, atol=1e-4)
  assert np.abs(np.asarray(full_features).sum(axes)).max() > 1e-2
  np.testing.assert_allclose(centred_features, full_features - full_features.mean(axes, keepdims=True), atol=1e-5)
  for k in ("kernel", "bias"):   # the head itself learns from the whole gradient
    np.testing.assert_allclose(centred_params["word_head"][k], full_params["word_head"][k], rtol=1e-6)
  if pool == "mean":
    # Every image asked for the same words: nothing of it reaches the tower, through the pooled embedding.
    full_tower, centred_tower = (jax.tree.leaves(g["image_encoder"]) for g in
                                 (jax.grad(lambda p, m=m: (m.apply({"params": p}, images, method=SyCoCa.word_logits)
                                                           * weights[:1]).sum())(params) for m in (model, centred)))
    assert max(float(jnp.abs(g).max()) for g in full_tower) > 1e-3
    assert max(float(jnp.abs(g).max()) for g in centred_tower) < 1e-5


def test_text_is_causal():
  cfg, model, params = _setup()
  images, text = random_batch(cfg)
  changed = text.at[:, 3].set((text[:, 3] + 1) % cfg.text.vocab_size)
  encode_text = _jit_apply(model, method=SyCoCa.encode_text)
  enc = lambda t: encode_text(params, t)["tokens"]
  a, b = enc(text), enc(changed)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-5)
  assert not np.allclose(a[:, 3:], b[:, 3:], atol=1e-4)

  image_tokens = _jit_apply(model, method=SyCoCa.encode_image)(params, images)["tokens"]
  caption_logits = _jit_apply(model, method=SyCoCa.caption_logits)
  logits = lambda t: caption_logits(params, image_tokens, t)
  la, lb = logits(text), logits(changed)
  np.testing.assert_allclose(la[:, :3], lb[:, :3], atol=1e-5)  # positions 0..2 predict tokens 1..3
  assert not np.allclose(la[:, 3:], lb[:, 3:], atol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_padding_is_masked(legacy):
  """What a padding token's embedding is must not matter (unless the legacy open_clip mask is asked for)."""
  cfg, model, params = _setup(**{"text.legacy_cls_mask": legacy})
  images, text = random_batch(cfg)
  perturbed = jax.tree.map(lambda x: x, params)
  table = perturbed["text_encoder"]["token_embedding"]["embedding"]
  perturbed["text_encoder"]["token_embedding"]["embedding"] = table.at[0].add(3.0)  # pad id 0
  encode_text = _jit_apply(model, method=SyCoCa.encode_text)
  embed = lambda p: encode_text(p, text)["embedding"]
  same = np.allclose(embed(params), embed(perturbed), atol=1e-5)
  assert same != legacy

  # TG-MIM's cross-attention to the caption ignores padding too.
  mim = _jit_apply(model, heads=("mim",))
  out = lambda p: mim(p, images, text)["mim_pred"]
  if not legacy:
    np.testing.assert_allclose(out(params), out(perturbed), atol=1e-5)


def _with_attention(model, impl):
  towers = ("image_encoder", "text_encoder", "text_decoder", "image_decoder")
  with_impl = lambda m: m.clone(tower=dataclasses.replace(m.tower, attention_impl=impl))
  return model.clone(**{t: with_impl(getattr(model, t)) for t in towers})


@pytest.mark.parametrize("legacy", [False, True])
def test_cudnn_attention_is_the_same_function(legacy, monkeypatch):
  """attention_impl='cudnn' gives its kernel only a causal flag and key lengths, never a mask, and computes what
  'xla' computes. Run here with XLA's kernel behind it (no GPU); float32, which the real cuDNN path refuses."""
  cfg, model, params = _setup(**{"text.legacy_cls_mask": legacy})
  images, text = random_batch(cfg)  # captions of 4, 5 and 6 tokens out of 12: padding in every row
  text = text.at[2].set(jnp.arange(3, 3 + cfg.text.context_length))  # and one full row
  calls = []
  real = jax.nn.dot_product_attention

  def kernel(*args, mask=None, implementation=None, **kwargs):
    calls.append((implementation, None if mask is None else mask.shape))
    return real(*args, mask=mask, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", kernel)
  # Jitted: the kernel is called while tracing, which is where `calls` records it.
  run = lambda m: (_jit_apply(m, heads=HEADS)(params, images, text),
                   _jit_apply(m, method=SyCoCa.encode_text)(params, text))
  (xla, xla_text), (cudnn, cudnn_text) = run(model), run(_with_attention(model, "cudnn"))
  xla_calls, cudnn_calls = calls[:len(calls) // 2], calls[len(calls) // 2:]
  assert {impl for impl, _ in xla_calls} == {"xla"} and {impl for impl, _ in cudnn_calls} == {"cudnn"}
  assert all(shape is None for _, shape in cudnn_calls)
  # Under 'xla' only the text encoder has a mask, [B, 1, 1, S]: no [B, H, L, S] tensor is built outside the kernel.
  assert {shape for _, shape in xla_calls} == {None, (3, 1, 1, cfg.text.context_length + 1)}

  for key in ("image_embedding", "text_embedding", "mim_pred"):
    np.testing.assert_allclose(cudnn[key], xla[key], atol=2e-5, err_msg=key)
  # Token features and logits agree wherever anything reads them: at real tokens (padding rows may differ).
  real = np.asarray(text != cfg.pad_id)
  np.testing.assert_allclose(np.asarray(cudnn_text["tokens"])[real], np.asarray(xla_text["tokens"])[real], atol=2e-5)
  np.testing.assert_allclose(np.asarray(cudnn["caption_logits"])[real[:, :-1]],
                             np.asarray(xla["caption_logits"])[real[:, :-1]], atol=2e-5)


@pytest.mark.slow(reason="compiles the four towers twice, once with the Pallas kernel interpreted in every attention")
def test_splash_attention_is_the_same_function():
  """attention_impl='splash' (TPU's Pallas kernel, interpreted here) computes what 'xla' computes in every tower:
  lengths padded to its 128-key blocks, padding and short captions hidden by segment ids, causal text."""
  cfg, model, params = _setup(**{"vision.depth": 1, "text.depth": 1, "text_decoder.depth": 1})
  images, text = random_batch(cfg)  # captions of 4, 5 and 6 tokens out of 12
  text = text.at[2].set(jnp.arange(3, 3 + cfg.text.context_length))  # and one full row
  # One program per model: op by op, the interpreted kernel dispatches and compiles each of its steps (1.7x the CPU).
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, images, text, heads=HEADS))(params)
  xla, splash = run(model), run(_with_attention(model, "splash"))
  for key in ("image_embedding", "text_embedding", "mim_pred"):
    np.testing.assert_allclose(splash[key], xla[key], atol=2e-5, err_msg=key)
  real = np.asarray(text != cfg.pad_id)
  np.testing.assert_allclose(np.asarray(splash["caption_logits"])[real[:, :-1]],
                             np.asarray(xla["caption_logits"])[real[:, :-1]], atol=2e-5)


@pytest.mark.slow(reason="the Pallas kernel interpreted on CPU, forward and backward, on 8 devices")
def test_splash_attention_runs_per_chip_under_the_mesh_and_differentiates():
  """Under a mesh in context (as in the train step) the kernel runs on each chip's examples under shard_map;
  values and gradients equal XLA's attention, for causal self-attention and cross-attention with key lengths."""
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  q, kv = (jnp.asarray(rng.standard_normal((8, n, 2, 8)), jnp.float32) for n in (17, 9))
  lengths = jnp.asarray(rng.integers(1, 10, 8), jnp.int32)
  q, kv, lengths = jax.device_put((q, kv, lengths), jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))

  def loss(attention, q, kv):
    return (attention(q, q, q, causal=True) ** 2).sum() + (attention(q, kv, kv, kv_lengths=lengths) ** 2).sum()

  xla = lambda q, k, v, **kw: jax.nn.dot_product_attention(q, k, v, is_causal=kw.get("causal", False),
                                                            key_value_seq_lengths=kw.get("kv_lengths"))

  @jax.jit
  def splash(q, kv):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(loss, argnums=(1, 2))(layers.splash_attention, q, kv)

  want = jax.value_and_grad(loss, argnums=(1, 2))(xla, q, kv)
  got = splash(q, kv)
  assert "shard_map" in str(jax.make_jaxpr(splash)(q, kv))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def test_attention_impl_is_validated():
  with pytest.raises(ValueError, match=r"config.model.attention_impl: 'flash' is not one of xla, cudnn, splash"):
    build_model(tiny_model_config(attention_impl="flash"))
  with pytest.raises(ValueError, match=r"config.model.attention_impl: 'cudnn' .* bfloat16"):
    build_model(tiny_model_config(attention_impl="cudnn"))
  with pytest.raises(ValueError, match=r"config.model.text.heads: 'cudnn' attention needs a head width"):
    build_model(tiny_model_config(attention_impl="cudnn", dtype="bfloat16", **{"text.heads": 8}))
  model = build_model(tiny_model_config(attention_impl="cudnn", dtype="bfloat16"))
  assert model.text_encoder.tower.attention_impl == "cudnn"


@pytest.mark.slow(reason="compiles the gradient with and without rematerialisation")
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_recompute_the_same_gradients(policy):
  """A remat policy changes what the backward pass keeps and what it recomputes, never the gradients."""
  cfg, model, params = _setup()
  images, text = random_batch(cfg)

  def grads(m):
    def loss(p):
      out = m.apply({"params": p}, images, text, heads=HEADS)
      return sum(jnp.sum(out[k] * jnp.cos(jnp.arange(out[k].size).reshape(out[k].shape)))
                 for k in ("image_embedding", "text_embedding", "caption_logits", "mim_pred"))
    return jax.jit(jax.grad(loss))(params)  # as training runs it (op by op, it takes four times as long)

  remat = build_model(tiny_model_config(remat=True, remat_policy=policy))
  # Two compiled programs sum in different orders: float32 rounding, at the scale of the largest gradient.
  want = grads(model)
  atol = 2e-6 * max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol), grads(remat), want)
  with pytest.raises(ValueError, match=r"config.model.remat_policy: 'most' is not one of full, dots"):
    build_model(tiny_model_config(remat=True, remat_policy="most"))


def test_masks_follow_the_caption():
  cfg, model, params = _setup()
  images, text = random_batch(cfg)
  other = text.at[:, 1:3].set((text[:, 1:3] + 7) % cfg.text.vocab_size)
  forward = _jit_apply(model, heads=HEADS)
  masks = lambda t: forward(params, images, t)["masks"]
  assert not np.array_equal(masks(text).scores, masks(other).scores)
  assert not np.array_equal(masks(text).mim_mask, masks(other).mim_mask)


@pytest.mark.parametrize("end_token", [True, False])
def test_the_tokens_masks_and_the_token_loss_read(end_token):
  """Every token after the start token and before the padding; with masking.end_token=False, not the end token
  either. The mask scores are each patch's best cosine over exactly those tokens."""
  cfg, model, params = _setup(**{"masking.end_token": end_token})
  images, text = random_batch(cfg)
  out = _jit_apply(model, heads=HEADS + ("token",))(params, images, text)
  want = np.zeros(text.shape, bool)
  for i, n in enumerate(np.asarray((text != 0).sum(-1))):  # start, words, end
    want[i, 1:n if end_token else n - 1] = True
  np.testing.assert_array_equal(out["token_valid"], want)
  scores = masking_lib.patch_scores(out["patch_embeddings"], out["token_embeddings"], jnp.asarray(want))
  np.testing.assert_allclose(out["masks"].scores, scores, rtol=1e-6)
  # Another id in the end token's place: the causal text tower's earlier tokens do not see it, so only a score that
  # reads the end token can move.
  last = jnp.asarray((text != 0).sum(-1) - 1)
  other = text.at[jnp.arange(text.shape[0]), last].set(5)
  moved = _jit_apply(model, heads=HEADS)(params, images, other)["masks"].scores
  assert np.array_equal(moved, out["masks"].scores) != end_token


def test_bad_model_config_names_the_key():
  with pytest.raises(ValueError, match=r"config.model.vision.image_size: 30 is not divisible"):
    build_model(tiny_model_config(**{"vision.image_size": 30}))
  with pytest.raises(ValueError, match=r"config.model.masking.mim_ratio"):
    build_model(tiny_model_config(**{"masking.mim_ratio": 1.5}))
  with pytest.raises(ValueError, match=r"config.model.masking.strategy: 'attentive' .*not 'attn'"):
    build_model(tiny_model_config(**{"vision.pool": "attn"}))
  with pytest.raises(ValueError, match=r"config.model.vision.stem: 'hmlp' is not one of linear, patch_cnn, conv"):
    build_model(tiny_model_config(**{"vision.stem": "hmlp"}))
  with pytest.raises(ValueError, match=r"config.model.vision.stem_channels: the conv stem pools by .* \(2, 2, 2\)"):
    build_model(tiny_model_config(**{"vision.stem": "conv", "vision.stem_channels": (8, 8)}))
  with pytest.raises(ValueError, match=r"config.model.vision.stem_space_to_depth: 3 must be a positive divisor"):
    build_model(tiny_model_config(**{"vision.stem": "conv", "vision.stem_space_to_depth": 3}))
  with pytest.raises(ValueError, match=r"config.model.vision.stem_norm: 'batch' is not one of none, instance"):
    build_model(tiny_model_config(**{"vision.stem": "conv", "vision.stem_norm": "batch"}))
  with pytest.raises(ValueError, match=r"config.model.masking.score: 'pixels' is not one of tokens, caption, words"):
    build_model(tiny_model_config(**{"masking.score": "pixels"}))
  with pytest.raises(ValueError, match=r"config.model.vision.pool: 'cls' is not one of tok, gap, max, attn"):
    build_model(tiny_model_config(**{"vision.pool": "cls"}))
  with pytest.raises(ValueError, match=r"config.model.vision.stem_channels"):
    build_model(tiny_model_config(**{"vision.stem": "patch_cnn", "vision.stem_channels": (8, 0)}))
