"""Imports open_clip CoCa weights (coca_base, coca_ViT-B-32, coca_ViT-L-14, or any CoCa config) into sycoca_jax.

    python -m sycoca_jax.convert.open_clip --model-config=coca_ViT-B-32 \
        --checkpoint=open_clip_pytorch_model.bin --out=/tmp/coca_b32

reads an open_clip CoCa state dict (`.safetensors` through safetensors' numpy API, no torch needed; `.pt` /
`.bin` through torch.load(weights_only=True)) and writes a params-only sycoca_jax checkpoint (see
sycoca_jax.checkpoint.save_params) whose run config carries the matching model config. CoCa has no image
decoder: that tower (the TG-MIM head) is freshly initialised, so the result can be fine-tuned as SyCoCa.

The mapping is a renaming plus three layout changes:
  * torch Linear weights are [out, in]; flax Dense kernels are [in, out] (transpose).
  * nn.MultiheadAttention packs q, k, v in one in_proj_weight [3D, D] (or keeps q/k/v_proj_weight apart when
    the keys have another width, as in the attentional pooler); ours has three Dense layers.
  * conv1's weight [D, 3, p, p] becomes a Dense kernel over patches flattened in (p1, p2, c) order
    (sycoca_jax.models.vit.patchify), since images are NHWC here.
open_clip's text tower in released CoCa weights masks padding with a mask shifted by one position
(`correct_cls_mask=False`); the converted config sets `text.legacy_cls_mask=True` to reproduce it.

Model configs: open_clip's three CoCa configs ship next to this file (open_clip is MIT licensed, see
OPEN_CLIP_LICENSE.txt); any other open_clip model-config JSON can be given by path.
"""

import argparse
import ast
import json
import logging
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sycoca_jax import config_lib, paths
from sycoca_jax.models import sycoca

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
KNOWN_CONFIGS = ("coca_base", "coca_ViT-B-32", "coca_ViT-L-14")

# Defaults of open_clip's CLIPVisionCfg / CLIPTextCfg / MultimodalCfg for the keys we read.
_VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
                        attentional_pool=False, attn_pooler_queries=256, attn_pooler_heads=8, pool_type="tok")
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                      embed_cls=False, pad_id=0)
_MULTIMODAL_DEFAULTS = dict(width=512, heads=8, layers=12)

# open_clip options whose non-default values change the network in ways sycoca_jax does not express.
# Model-config keys an import may set (the rest is determined by the open_clip config).
_OVERRIDABLE = ("image_decoder", "masking", "remat", "dtype", "init_logit_scale", "words_head")

_UNSUPPORTED = {
    "vision_cfg": dict(ls_init_value=None, no_ln_pre=False, pos_embed_type="learnable", final_ln_after_pool=False,
                       act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                       scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                       timm_model_name=None),
    "text_cfg": dict(ls_init_value=None, no_causal_mask=False, proj_bias=False, proj_type="linear",
                     act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                     scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                     hf_model_name=None),
    "multimodal_cfg": dict(ls_init_value=None),
}


# ------------------------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------------------------


def load_open_clip_config(name_or_path: str) -> dict:
  """An open_clip model config: one of KNOWN_CONFIGS by name, or a JSON file's path."""
  if os.path.exists(name_or_path):
    path = name_or_path
  elif name_or_path in KNOWN_CONFIGS:
    path = os.path.join(CONFIG_DIR, name_or_path + ".json")
  else:
    raise ValueError(f"--model-config={name_or_path!r} is neither a file nor one of {KNOWN_CONFIGS}.")
  with open(path) as f:
    return json.load(f)


def model_config_from_open_clip(oc: dict) -> ml_collections.ConfigDict:
  """The sycoca_jax model config (sycoca.default_model_config layout) equivalent to open_clip CoCa config `oc`."""
  if "multimodal_cfg" not in oc:
    raise ValueError("Not a CoCa config: it has no 'multimodal_cfg' (plain CLIP models are not supported).")
  v = {**_VISION_DEFAULTS, **oc.get("vision_cfg", {})}
  t = {**_TEXT_DEFAULTS, **oc.get("text_cfg", {})}
  m = {**_MULTIMODAL_DEFAULTS, **oc["multimodal_cfg"]}
  for section, options in _UNSUPPORTED.items():
    given = {"vision_cfg": v, "text_cfg": t, "multimodal_cfg": m}[section]
    for key, default in options.items():
      if given.get(key, default) != default:
        raise ValueError(f"open_clip {section}.{key}={given[key]!r} is not supported by the converter "
                         f"(only {default!r}).")
  if isinstance(v["layers"], (list, tuple)):
    raise ValueError("open_clip vision_cfg.layers is a list (ModifiedResNet): only ViT towers are supported.")
  if not isinstance(v["attentional_pool"], bool):
    raise ValueError(f"open_clip vision_cfg.attentional_pool={v['attentional_pool']!r}: only True/False "
                     "(the released CoCa pooling) is supported.")
  if v["pool_type"] != "tok":
    raise ValueError(f"open_clip vision_cfg.pool_type={v['pool_type']!r}: only 'tok' is supported.")
  if not t["embed_cls"]:
    raise ValueError("open_clip text_cfg.embed_cls must be true (CoCa's appended CLS token).")
  if m["width"] != t["width"]:
    raise ValueError(f"open_clip multimodal_cfg.width={m['width']} differs from text_cfg.width={t['width']}.")
  image_width = oc["embed_dim"] if v["attentional_pool"] else v["width"]
  if image_width != m["width"]:
    raise ValueError(f"open_clip's decoder cross-attends to image tokens of width {image_width} with "
                     f"multimodal_cfg.width={m['width']}: open_clip itself cannot run this config.")
  image_size = v["image_size"]
  if isinstance(image_size, (list, tuple)):
    if len(set(image_size)) != 1:
      raise ValueError(f"open_clip vision_cfg.image_size={image_size}: only square images are supported.")
    image_size = image_size[0]
  patch_size = v["patch_size"]
  if isinstance(patch_size, (list, tuple)):
    if len(set(patch_size)) != 1:
      raise ValueError(f"open_clip vision_cfg.patch_size={patch_size}: only square patches are supported.")
    patch_size = patch_size[0]

  cfg = sycoca.default_model_config()
  cfg.embed_dim = oc["embed_dim"]
  cfg.act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"
  cfg.vision.update(
      image_size=int(image_size), patch_size=int(patch_size), width=v["width"], depth=v["layers"],
      heads=v["width"] // v["head_width"], mlp_ratio=float(v["mlp_ratio"]),
      pool="attn" if v["attentional_pool"] else "tok",
      attn_pooler_queries=v["attn_pooler_queries"], attn_pooler_heads=v["attn_pooler_heads"])
  cfg.text.update(vocab_size=t["vocab_size"], context_length=t["context_length"], width=t["width"],
                  depth=t["layers"], heads=t["heads"], mlp_ratio=float(t["mlp_ratio"]),
                  # Released CoCa weights were trained with the shifted mask (open_clip's default).
                  legacy_cls_mask=not t.get("correct_cls_mask", False))
  cfg.pad_id = t["pad_id"]
  # open_clip builds its MultimodalTransformer without passing multimodal_cfg.mlp_ratio: it is always 4.
  cfg.text_decoder.update(width=m["width"], depth=m["layers"], heads=m["heads"], mlp_ratio=4.0)
  if cfg.vision.pool == "attn":
    # Attentional pooling leaves no per-patch tokens to score, so attentive masking cannot run; random
    # (FLIP-style) masking is the strategy that works with this geometry when fine-tuning.
    cfg.masking.strategy = "random"
  sycoca.validate_model_config(cfg)
  return cfg


def run_config_for(model_cfg: ml_collections.ConfigDict, oc: Optional[dict] = None) -> ml_collections.ConfigDict:
  """A run config (config_lib.default_config layout) around an imported model: what load_params returns."""
  config = config_lib.default_config()
  config.model = model_cfg
  config.data.update(image_size=model_cfg.vision.image_size, max_len=model_cfg.text.context_length)
  hf_tokenizer = (oc or {}).get("text_cfg", {}).get("hf_tokenizer_name")
  if hf_tokenizer:
    logging.warning("The model was trained with the Hugging Face tokenizer %r: set config.data.tokenizer / "
                    "tokenizer_path to an equivalent one before using the text towers.", hf_tokenizer)
  else:
    # open_clip tokenizes every CoCa config without an HF tokenizer with CLIP's BPE, coca_base included (its
    # 64,000-row embedding is larger than the 49,408 ids the BPE produces).
    config.data.tokenizer = "clip_bpe"
  return config


# ------------------------------------------------------------------------------------------------------------------
# State dicts.
# ------------------------------------------------------------------------------------------------------------------


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """An open_clip checkpoint as {name: float32 numpy array}, 'module.' prefixes (DDP) stripped."""
  if path.endswith(".safetensors"):
    state = _load_safetensors(path)
  else:
    try:
      import torch  # only for pickled checkpoints
    except ModuleNotFoundError:
      raise ModuleNotFoundError(
          f"Reading {path} (a pickled PyTorch checkpoint) needs torch: pip install torch (or pip install -e '.[torch]' "
          "in this repository), or give the model's .safetensors file, which is read without torch.") from None

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:  # open_clip training checkpoints
      obj = obj["state_dict"]
    state = {k: v.detach().float().numpy() for k, v in obj.items()}
  return {re.sub(r"^module\.", "", k): np.asarray(v, np.float32) for k, v in state.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  out = {}
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      try:
        out[key] = f.get_tensor(key)
      except TypeError:  # numpy has no bfloat16: widen the raw bytes ourselves
        out[key] = _read_bf16(path, key)
  return out


def _read_bf16(path: str, key: str) -> np.ndarray:
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    info = header[key]
    if info["dtype"] != "BF16":
      raise TypeError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    f.seek(8 + header_len + start)
    raw = np.frombuffer(f.read(end - start), np.uint16)
  return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


class _Reader:
  """Pops tensors out of a state dict, so that any left unread at the end can be reported."""

  def __init__(self, state: dict[str, np.ndarray]):
    self.state = dict(state)

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.state:
      raise KeyError(f"The checkpoint has no tensor {name!r}: is it an open_clip CoCa state dict of this config?")
    return self.state.pop(name)

  def has(self, name: str) -> bool:
    return name in self.state


def _dense(w: np.ndarray, b: Optional[np.ndarray] = None) -> dict:
  out = {"kernel": w.T}
  if b is not None:
    out["bias"] = b
  return out


def _ln(r: _Reader, prefix: str) -> dict:
  return {"scale": r(prefix + ".weight"), "bias": r(prefix + ".bias")}


def _mha(r: _Reader, prefix: str) -> dict:
  """torch nn.MultiheadAttention -> our Attention's query / key / value / out Dense layers."""
  if r.has(prefix + ".in_proj_weight"):
    wq, wk, wv = np.split(r(prefix + ".in_proj_weight"), 3, axis=0)
  else:  # kdim / vdim != embed_dim: separate projection weights
    wq, wk, wv = (r(f"{prefix}.{n}_proj_weight") for n in ("q", "k", "v"))
  bq, bk, bv = np.split(r(prefix + ".in_proj_bias"), 3)
  return {"query": _dense(wq, bq), "key": _dense(wk, bk), "value": _dense(wv, bv),
          "out": _dense(r(prefix + ".out_proj.weight"), r(prefix + ".out_proj.bias"))}


def _block(r: _Reader, prefix: str, cross: bool = False) -> dict:
  """open_clip ResidualAttentionBlock -> our layers.Block."""
  out = {"ln_1": _ln(r, prefix + ".ln_1"), "attn": _mha(r, prefix + ".attn"), "ln_2": _ln(r, prefix + ".ln_2"),
         "mlp": {"c_fc": _dense(r(prefix + ".mlp.c_fc.weight"), r(prefix + ".mlp.c_fc.bias")),
                 "c_proj": _dense(r(prefix + ".mlp.c_proj.weight"), r(prefix + ".mlp.c_proj.bias"))}}
  if cross:
    out["ln_1_kv"] = _ln(r, prefix + ".ln_1_kv")
  return out


def _transformer(layers: list[dict], scan: bool) -> dict:
  """Per-layer params -> our layers.Transformer's tree (`layers_{i}`, or one stacked `layers` when scanned)."""
  if scan:
    return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
  return {f"layers_{i}": layer for i, layer in enumerate(layers)}


def convert_state_dict(state: dict[str, np.ndarray], cfg: ml_collections.ConfigDict, *, seed: int = 0) -> Any:
  """open_clip CoCa state dict -> sycoca_jax params for model config `cfg` (image decoder freshly initialised).

  Every tensor of the state dict must be used and every parameter of the model (but the image decoder) filled,
  with the shape the model expects; anything else raises, naming the tensor.
  """
  r = _Reader(state)
  scan = cfg.scan_layers
  v, t, d = cfg.vision, cfg.text, cfg.text_decoder

  conv = r("visual.conv1.weight")  # [D, 3, p, p] -> [(p1 p2 c), D], the order of vit.patchify
  image = {
      "conv1": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])},
      "class_embedding": r("visual.class_embedding"),
      "positional_embedding": r("visual.positional_embedding"),
      "ln_pre": _ln(r, "visual.ln_pre"),
      "transformer": _transformer(
          [{"self": _block(r, f"visual.transformer.resblocks.{i}")} for i in range(v.depth)], scan),
      "ln_post": _ln(r, "visual.ln_post"),
      "proj": r("visual.proj"),
  }
  if v.pool == "attn":
    image["attn_pool"] = {"query": r("visual.attn_pool.query"), "attn": _mha(r, "visual.attn_pool.attn"),
                          "ln_q": _ln(r, "visual.attn_pool.ln_q"), "ln_k": _ln(r, "visual.attn_pool.ln_k")}
  text = {
      "token_embedding": {"embedding": r("text.token_embedding.weight")},
      "cls_emb": r("text.cls_emb"),
      "positional_embedding": r("text.positional_embedding"),
      "transformer": _transformer(
          [{"self": _block(r, f"text.transformer.resblocks.{i}")} for i in range(t.depth)], scan),
      "ln_final": _ln(r, "text.ln_final"),
      "text_projection": r("text.text_projection"),
  }
  decoder = {
      "transformer": _transformer(
          [{"self": _block(r, f"text_decoder.resblocks.{i}"),
            "cross": _block(r, f"text_decoder.cross_attn.{i}", cross=True)} for i in range(d.depth)], scan),
      "ln_final": _ln(r, "text_decoder.ln_final"),
      "text_projection": r("text_decoder.text_projection"),
  }
  logit_scale = r("logit_scale").reshape(())
  # open_clip's CoCa models have no logit bias (only its SigLIP models learn one): ours keeps its initial value.
  logit_bias = r("logit_bias").reshape(()) if r.has("logit_bias") else None
  # Buffers that older open_clip versions saved with the weights; they are rebuilt, not learned.
  for name in [k for k in r.state if k.endswith("attn_mask")]:
    r(name)
  if r.state:
    raise ValueError(f"Unused tensors in the checkpoint (unsupported open_clip options?): {sorted(r.state)[:10]}")

  model = sycoca.build_model(cfg)
  if logit_bias is None:
    logit_bias = np.float32(model.init_logit_bias)
  params = {"image_encoder": image, "text_encoder": text, "text_decoder": decoder,
            "image_decoder": _init_image_decoder(model, seed), "logit_scale": logit_scale,
            "logit_bias": logit_bias}
  if cfg.words_head:  # open_clip has none: a fresh one, as the image decoder
    head = nn.Dense(t.vocab_size)
    params["word_head"] = jax.device_get(jax.jit(head.init)(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.embed_dim))
                                                            )["params"])
  _check_shapes(params, jax.eval_shape(lambda: sycoca.init_params(model, jax.random.PRNGKey(0))))
  return jax.tree.map(jnp.asarray, params)


def _init_image_decoder(model: sycoca.SyCoCa, seed: int) -> Any:
  """Fresh image-decoder params, initialised on its own (the inputs only need the shapes SyCoCa feeds it)."""
  enc, txt = model.image_encoder, model.text_encoder
  num_patches = enc.num_patches
  visible = jnp.zeros((1, num_patches // 2, enc.tower.width), jnp.float32)  # per-patch encoder tokens
  restore = jnp.arange(num_patches, dtype=jnp.int32)[None]
  text_tokens = jnp.zeros((1, txt.context_length, txt.tower.width), jnp.float32)
  text_valid = jnp.ones((1, txt.context_length), bool)
  init = jax.jit(model.image_decoder.init)
  return jax.device_get(init(jax.random.PRNGKey(seed), visible, restore, text_tokens, text_valid)["params"])


def _check_shapes(params: Any, expected: Any) -> None:
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  if got.keys() != want.keys():
    raise ValueError(f"Converted params differ from the model's: missing {sorted(want.keys() - got.keys())[:5]}, "
                     f"unexpected {sorted(got.keys() - want.keys())[:5]}.")
  bad = [(k, got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])]
  if bad:
    raise ValueError(f"Converted params have wrong shapes (name, got, expected): {bad[:5]}. Does the model "
                     "config match the checkpoint?")


# ------------------------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------------------------


def convert(model_config: str, checkpoint: str, *, scan_layers: bool = False, overrides: Optional[dict] = None,
            seed: int = 0) -> tuple[ml_collections.ConfigDict, Any]:
  """(model config, params) for an open_clip model-config name / JSON path and a checkpoint file.

  `overrides` sets model-config keys by dotted name (e.g. {'image_decoder.depth': 4}) before conversion;
  keys that the open_clip checkpoint determines cannot be changed that way.
  """
  cfg = model_config_from_open_clip(load_open_clip_config(model_config))
  cfg.scan_layers = scan_layers
  for key, value in (overrides or {}).items():
    if key.split(".")[0] not in _OVERRIDABLE:
      raise ValueError(f"override {key}: only {_OVERRIDABLE} can be set; the rest is fixed by the checkpoint.")
    config_lib.set_by_path(cfg, key, value)
  sycoca.validate_model_config(cfg)
  return cfg, convert_state_dict(load_state_dict(checkpoint), cfg, seed=seed)


def save(directory: str, params: Any, model_cfg: ml_collections.ConfigDict, oc: Optional[dict] = None) -> None:
  """Writes a params-only checkpoint, readable with sycoca_jax.checkpoint.load_params(directory)."""
  from sycoca_jax import checkpoint

  checkpoint.save_params(directory, params, run_config_for(model_cfg, oc))


def _parse_override(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--override {text!r}: expected KEY=VALUE.")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model-config", required=True,
                      help=f"one of {', '.join(KNOWN_CONFIGS)}, or the path of an open_clip model-config JSON")
  parser.add_argument("--checkpoint", required=True, help="open_clip state dict: .safetensors, .pt or .bin")
  parser.add_argument("--out", required=True, help="directory or gs:// URL to write the sycoca_jax checkpoint to")
  parser.add_argument("--scan-layers", action="store_true", help="stack layers for model.scan_layers=True")
  parser.add_argument("--override", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                      help="model-config override, e.g. image_decoder.depth=4 (repeatable)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the fresh image decoder")
  args = parser.parse_args(argv)

  oc = load_open_clip_config(args.model_config)
  cfg, params = convert(args.model_config, args.checkpoint, scan_layers=args.scan_layers,
                        overrides=dict(args.override), seed=args.seed)
  save(args.out, params, cfg, oc)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"Wrote {count / 1e6:.1f}M parameters to {paths.resolve(args.out)} "
        f"(load with sycoca_jax.checkpoint.load_params).")


if __name__ == "__main__":
  main()
