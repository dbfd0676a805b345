"""Imported open_clip CoCa weights give open_clip's numbers: embeddings, caption logits, greedy captions, tokens.

Tiny randomly initialised open_clip CoCa models (custom model-config JSONs) are saved as .safetensors and .pt,
converted with sycoca_jax.convert.open_clip and run on the same inputs on both sides. Needs torch and
open-clip-torch (the `torch` extra); skipped without them.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import checkpoint
from sycoca_jax import decoding
from sycoca_jax.convert import open_clip as convert_lib
from sycoca_jax.data import tokenizers
from sycoca_jax.models.sycoca import SyCoCa, build_model, init_params

for _name, _extra in (("torch", "torch"), ("open_clip", "open-clip-torch")):
  if importlib.util.find_spec(_name) is None:
    pytest.skip(f"needs {_extra} (pip install 'sycoca_jax[torch]')", allow_module_level=True)

# torch and open_clip are imported when the module's first test runs, not when it is collected: every xdist worker
# collects every module, and these two take seconds to import.
torch = open_clip = save_file = None


@pytest.fixture(scope="module", autouse=True)
def _torch_and_open_clip():
  global torch, open_clip, save_file  # pylint: disable=global-statement
  import open_clip as open_clip_module  # pylint: disable=g-import-not-at-top
  import torch as torch_module  # pylint: disable=g-import-not-at-top
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  torch, open_clip, save_file = torch_module, open_clip_module, safetensors_torch.save_file

RTOL = 1e-4
SMALL_DECODER = {"image_decoder.width": 16, "image_decoder.depth": 1, "image_decoder.heads": 2}

# Three geometries: coca_ViT-* style (attentional pooling, CLIP vocabulary), coca_base style (CLS pooling,
# QuickGELU, an odd patch size), and a tower with other widths, heads and MLP ratios on every side.
GEOMETRIES = {
    "attn_pool": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 4,
                       "output_tokens": True},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
    "cls_pool": {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 36, "layers": 2, "width": 32, "head_width": 16, "patch_size": 12,
                       "output_tokens": True},
        "text_cfg": {"context_length": 10, "vocab_size": 500, "width": 32, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 10, "vocab_size": 500, "width": 32, "heads": 4, "layers": 1},
    },
    "mixed_widths": {
        "embed_dim": 40,
        "vision_cfg": {"image_size": 48, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16,
                       "mlp_ratio": 2.0, "attentional_pool": True, "attn_pooler_queries": 5,
                       "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 40, "heads": 5, "layers": 3,
                     "mlp_ratio": 3.0, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": 300, "width": 40, "heads": 2, "layers": 2,
                           "mlp_ratio": 2},
    },
}


def _special_ids(vocab_size):
  """(bos, eos): CLIP BPE's start / end ids, or the last two ids of a custom vocabulary."""
  return (49406, 49407) if vocab_size == 49408 else (vocab_size - 2, vocab_size - 1)


def _randomize(model, seed):
  """Every weight random (open_clip leaves biases at 0, norms at 1, and some projections uninitialised)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      noise = torch.randn(p.shape, generator=gen)
      last = name.split(".")[-1]
      if p.ndim == 1:
        is_norm_scale = ".ln_" in "." + name and last == "weight"
        p.copy_((1.0 if is_norm_scale else 0.0) + (0.2 if is_norm_scale else 0.5) * noise)
      elif "embedding" in name or last in ("query", "cls_emb"):
        p.copy_(0.5 * noise)
      elif last in ("proj", "text_projection"):  # used as x @ W: fan-in is the first axis
        p.copy_(noise * p.shape[0] ** -0.5)
      else:  # torch Linear / in_proj / conv weights: fan-in is everything but the first axis
        p.copy_(noise * int(np.prod(p.shape[1:])) ** -0.5)


_IMPORTED: dict = {}


def _import(name, tmp_path_factory):
  """(name, open_clip model, sycoca model, params, model config, config path, checkpoint paths), once per module."""
  if name not in _IMPORTED:
    _IMPORTED[name] = _build(name, tmp_path_factory.mktemp(name))
  return _IMPORTED[name]


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def imported(request, tmp_path_factory):
  return _import(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mixed_widths(tmp_path_factory):
  """The geometry with unequal widths and head counts everywhere: enough for the slower single-geometry tests."""
  return _import("mixed_widths", tmp_path_factory)


def _build(name, tmp):
  config_path = tmp / f"tiny_coca_{name}.json"
  config_path.write_text(json.dumps({**GEOMETRIES[name], "custom_text": True}))
  open_clip.add_model_config(str(config_path))
  torch.manual_seed(0)
  oc_model = open_clip.create_model(config_path.stem, pretrained=None).eval()
  _randomize(oc_model, seed=sorted(GEOMETRIES).index(name))
  state = {k: v.contiguous() for k, v in oc_model.state_dict().items()}
  paths = {"safetensors": tmp / "model.safetensors", "pt": tmp / "model.pt"}
  save_file(state, str(paths["safetensors"]))
  torch.save(state, str(paths["pt"]))

  cfg, params = convert_lib.convert(str(config_path), str(paths["safetensors"]), overrides=SMALL_DECODER)
  model = build_model(cfg)
  return dict(name=name, oc=oc_model, model=model, params=params, cfg=cfg, config_path=config_path, paths=paths,
              forward=_forward_fn(model))


def _forward_fn(model):
  """One jitted program for everything the tests compare (one compile per geometry)."""

  @jax.jit
  def forward(params, images, text):
    variables = {"params": params}
    image_out = model.apply(variables, images, method=SyCoCa.encode_image)
    text_out = model.apply(variables, text, method=SyCoCa.encode_text)
    return {"image_embedding": image_out["embedding"], "image_tokens": image_out["tokens"],
            "text_embedding": text_out["embedding"], "logit_scale": model.apply(variables, method=SyCoCa.temperature),
            "caption_logits": model.apply(variables, image_out["tokens"], text, method=SyCoCa.caption_logits)}

  return forward


def _inputs(cfg, seed=0):
  """Images [B, S, S, 3] and captions [B, L] with bos, random ids, eos and (for all but one row) padding."""
  rng = np.random.RandomState(seed)
  size, length, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
  bos, eos = _special_ids(vocab)
  images = rng.randn(3, size, size, 3).astype(np.float32)
  text = np.zeros((3, length), np.int32)
  for row, n in enumerate((length, length // 2, 3)):
    text[row, :n] = rng.randint(1, min(vocab - 2, 49406), n)
    text[row, 0], text[row, n - 1] = bos, eos
  return images, text


def _rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _torch_images(images):
  return torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW


def test_pt_and_safetensors_read_the_same(imported):
  from_pt = convert_lib.load_state_dict(str(imported["paths"]["pt"]))
  from_safetensors = convert_lib.load_state_dict(str(imported["paths"]["safetensors"]))
  assert from_pt.keys() == from_safetensors.keys()
  for key, value in from_pt.items():
    np.testing.assert_array_equal(value, from_safetensors[key], err_msg=key)


def test_config_mapping(imported):
  cfg, geometry = imported["cfg"], GEOMETRIES[imported["name"]]
  assert cfg.text.legacy_cls_mask
  assert cfg.vision.pool == ("attn" if geometry["vision_cfg"].get("attentional_pool") else "tok")
  assert cfg.act == ("quick_gelu" if geometry.get("quick_gelu") else "gelu")
  assert cfg.vision.heads == geometry["vision_cfg"]["width"] // geometry["vision_cfg"]["head_width"]
  assert cfg.text_decoder.heads == geometry["multimodal_cfg"]["heads"]


def _compare(forward, params, oc, images, text):
  """Max relative error of each output against open_clip's."""
  with torch.no_grad():
    ref = oc(_torch_images(images), torch.from_numpy(text).long())
    _, ref["image_tokens"] = oc._encode_image(_torch_images(images))
  ours = forward(params, jnp.asarray(images), jnp.asarray(text))
  names = {"image_embedding": "image_features", "image_tokens": "image_tokens", "text_embedding": "text_features",
           "caption_logits": "logits", "logit_scale": "logit_scale"}
  return {k: _rel(ours[k], ref[v]) for k, v in names.items()}


def test_embeddings_and_caption_logits_match(imported):
  images, text = _inputs(imported["cfg"])
  errors = _compare(imported["forward"], imported["params"], imported["oc"], images, text)
  print(f"\n{imported['name']}: max relative errors {errors}")
  assert max(errors.values()) < RTOL, errors


def _open_clip_greedy(oc, images, bos, eos, pad, max_len):
  """Reference greedy loop on open_clip's forward (no KV cache): pad and bos never chosen, stop at eos."""
  tokens = torch.full((images.shape[0], 1), bos, dtype=torch.long)
  with torch.no_grad():
    for _ in range(max_len - 1):
      logits = oc(_torch_images(images), tokens, output_labels=False)["logits"][:, -1]
      logits[:, [pad, bos]] = -float("inf")
      tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
  return _pad_after_eos(tokens.numpy(), eos, pad)


def _pad_after_eos(tokens, eos, pad):
  tokens = np.array(tokens)
  for row in tokens:
    hits = np.flatnonzero(row[1:] == eos)
    if hits.size:
      row[hits[0] + 2:] = pad
  return tokens


def test_greedy_captions_match(imported):
  cfg, model, params = imported["cfg"], imported["model"], imported["params"]
  images, _ = _inputs(cfg, seed=1)
  bos, eos = _special_ids(cfg.text.vocab_size)
  max_len = cfg.text.context_length
  ref = _open_clip_greedy(imported["oc"], images, bos, eos, cfg.pad_id, max_len)

  # The same loop on our side, through the fixed-shape forward: causal towers read only the row's prefix.
  tokens = np.full((images.shape[0], max_len), cfg.pad_id, np.int32)
  tokens[:, 0] = bos
  for i in range(max_len - 1):
    logits = np.array(imported["forward"](params, jnp.asarray(images), jnp.asarray(tokens))["caption_logits"][:, i])
    logits[:, [cfg.pad_id, bos]] = -np.inf
    tokens[:, i + 1] = logits.argmax(-1)
  np.testing.assert_array_equal(_pad_after_eos(tokens, eos, cfg.pad_id), ref)



def test_kv_cached_greedy_matches_open_clip(mixed_widths):
  imported = mixed_widths
  cfg = imported["cfg"]
  images, _ = _inputs(cfg, seed=1)
  bos, eos = _special_ids(cfg.text.vocab_size)
  max_len = cfg.text.context_length
  ref = _open_clip_greedy(imported["oc"], images, bos, eos, cfg.pad_id, max_len)
  caption = decoding.build_captioner(imported["model"], sampler="greedy", bos_id=bos, eos_id=eos, max_len=max_len)
  np.testing.assert_array_equal(np.asarray(caption(imported["params"], jnp.asarray(images)).tokens), ref)


@pytest.mark.slow(reason="the conversion command line in a subprocess (imports torch)")
def test_a_words_head_is_added_fresh_and_the_rest_is_the_same_import(mixed_widths):
  """open_clip has no caption-words head: with model.words_head it starts from a fresh initialisation (not zeros,
  from which the tower would learn nothing through it), and every other weight is the plain import's."""
  cfg, params = convert_lib.convert(str(mixed_widths["config_path"]), str(mixed_widths["paths"]["safetensors"]),
                                    overrides={**SMALL_DECODER, "words_head": True})
  head = params.pop("word_head")
  assert head["kernel"].shape == (cfg.embed_dim, cfg.text.vocab_size)
  assert float(jnp.std(head["kernel"])) > 0.01
  jax.tree.map(np.testing.assert_array_equal, params, mixed_widths["params"])


def test_cli_writes_a_loadable_scanned_checkpoint(mixed_widths, tmp_path):
  imported = mixed_widths
  out = tmp_path / "imported"
  convert_lib.main([f"--model-config={imported['config_path']}", f"--checkpoint={imported['paths']['pt']}",
                    f"--out={out}", "--scan-layers"] + [f"--override={k}={v}" for k, v in SMALL_DECODER.items()])
  config, params, step = checkpoint.load_params(str(out))
  assert step == 0 and config.model.scan_layers
  expected = imported["cfg"].to_dict()
  expected["scan_layers"] = True
  assert config.model.to_dict() == expected
  assert config.data.max_len == config.model.text.context_length
  assert config.data.image_size == config.model.vision.image_size
  # The scanned tree is the unscanned one with each tower's layers stacked on a leading axis ...
  for tower in ("image_encoder", "text_encoder", "text_decoder"):
    stacked, unstacked = params[tower]["transformer"]["layers"], imported["params"][tower]["transformer"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    assert depth == len(unstacked)
    for i in range(depth):
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], stacked), unstacked[f"layers_{i}"])
    others = lambda t: {k: v for k, v in t.items() if k != "transformer"}
    jax.tree.map(np.testing.assert_array_equal, others(params[tower]), others(imported["params"][tower]))
  assert float(params["logit_scale"]) == float(imported["params"]["logit_scale"])
  # ... and nn.scan reads slice i as layer i: the scanned text tower gives open_clip's text embeddings.
  _, text = _inputs(config.model)
  ours = jax.jit(lambda p, t: build_model(config.model).apply({"params": p}, t, method=SyCoCa.encode_text))(
      params, jnp.asarray(text))["embedding"]
  with torch.no_grad():
    ref = imported["oc"].encode_text(torch.from_numpy(text).long())
  assert _rel(ours, ref) < RTOL


def test_released_configs_map():
  for name in convert_lib.KNOWN_CONFIGS:
    cfg = convert_lib.model_config_from_open_clip(convert_lib.load_open_clip_config(name))
    assert cfg.text.context_length == 76 and cfg.text.legacy_cls_mask
  base = convert_lib.model_config_from_open_clip(convert_lib.load_open_clip_config("coca_base"))
  assert (base.vision.pool, base.vision.heads, base.vision.patch_size, base.text.vocab_size) == ("tok", 12, 18, 64000)
  b32 = convert_lib.model_config_from_open_clip(convert_lib.load_open_clip_config("coca_ViT-B-32"))
  assert (b32.vision.pool, b32.vision.width, b32.text.width, b32.embed_dim) == ("attn", 768, 512, 512)
  # Every head initialises (abstractly): with 255 pooled queries and 49 patches, the TG-MIM decoder must read
  # per-patch tokens, not the pooler's. (Scanned layers: the same towers, each layer traced once.)
  b32.scan_layers = True
  shapes = jax.eval_shape(lambda: init_params(build_model(b32), jax.random.PRNGKey(0)))
  assert shapes["image_decoder"]["embed"]["kernel"].shape[0] == b32.vision.width


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "ls_init_value", 0.1),
    ("text_cfg", "embed_cls", False),
    ("vision_cfg", "attentional_pool", "parallel"),
])
def test_unsupported_options_fail_with_their_name(section, key, value):
  oc = json.loads(json.dumps(GEOMETRIES["attn_pool"]))
  oc[section][key] = value
  with pytest.raises(ValueError, match=key):
    convert_lib.model_config_from_open_clip(oc)


def test_tokenizer_matches_open_clip():
  texts = ["a photo of a cat", "Two  dogs, playing in the SNOW!", "caf\u00e9 &amp; na\u00efve r\u00e9sum\u00e9s",
           "a red circle left of a blue square 123 4567", "word " * 100, ""]
  ours = tokenizers.get_tokenizer("clip_bpe", max_len=76).encode(texts)
  ref = open_clip.get_tokenizer("coca_ViT-B-32")(texts).numpy()
  assert ref.shape == (len(texts), 76)
  np.testing.assert_array_equal(ours, ref)
