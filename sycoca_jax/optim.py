"""The optimizer: AdamW with regex weight-decay / freeze rules, warmup + cosine schedule, gradient clipping.

Rules are ordered (pattern, value) lists over '/'-joined parameter paths such as
'image_encoder/transformer/layers_3/self/attn/query/kernel'; the first pattern that matches wins.
"""

import re
from typing import Any, Sequence

import jax
import ml_collections
import optax


def param_paths(params: Any) -> Any:
  """A pytree of the same structure holding each leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), params)


def match_rules(params: Any, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
  """Maps each leaf to the value of the first rule whose pattern matches its path (re.search)."""
  compiled = [(re.compile(pattern), value) for pattern, value in rules]

  def pick(path):
    for pattern, value in compiled:
      if pattern.search(path):
        return value
    return default

  return jax.tree.map(pick, param_paths(params))


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=5e-4, warmup_steps=2000, end_lr_fraction=0.0,   # linear warmup, then cosine decay to end_lr_fraction*lr
      b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
      # Biases, norms, embeddings, tokens and the temperature are not decayed (CLIP / CoCa practice).
      no_decay=(r"/bias$", r"/scale$", r"embedding", r"class_embedding$", r"cls_emb$", r"mask_token$",
                r"attn_pool/query$", r"logit_scale$"),
      freeze=(),  # patterns of parameters that stay fixed, e.g. ('^image_encoder/',) for a locked image tower
  ))


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.lr * cfg.end_lr_fraction)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW over trainable leaves; leaves matching cfg.freeze or `frozen` get no update (and no state)."""
  decay_mask = match_rules(params, [(p, False) for p in cfg.no_decay], default=True)
  adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
  tx = optax.chain(*chain, adamw)
  freeze = tuple(cfg.freeze) + tuple(frozen)
  if not freeze:
    return tx
  labels = match_rules(params, [(p, "frozen") for p in freeze], default="trainable")
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
