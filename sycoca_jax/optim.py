"""The optimizer: AdamW with regex weight-decay / freeze rules, warmup + cosine schedule, gradient clipping, and
parameters kept inside bounds after every update (the temperature's [0, log 100], as open_clip).

Rules are ordered (pattern, value) lists over '/'-joined parameter paths such as
'image_encoder/transformer/layers_3/self/attn/query/kernel'; the first pattern that matches wins.
"""

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def _join(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_paths(params: Any) -> Any:
  """A pytree of the same structure holding each leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _join(path), params)


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
      # Biases, norms, embeddings, tokens, the temperature and the logit bias are not decayed (CLIP / CoCa practice).
      no_decay=(r"/bias$", r"/scale$", r"embedding", r"class_embedding$", r"cls_emb$", r"mask_token$",
                r"attn_pool/query$", r"logit_scale$", r"logit_bias$"),
      freeze=(),  # patterns of parameters that stay fixed, e.g. ('^image_encoder/',) for a locked image tower
      # (pattern, low, high): after every update a matching parameter is clipped into [low, high]. open_clip
      # clamps the log-temperature to [0, log 100] after each step: the forward pass uses exp(logit_scale)
      # unclamped, so a temperature at the cap still has a gradient and can come back down.
      param_bounds=((r"^logit_scale$", 0.0, math.log(100.0)),),
  ))


def warmup_cosine(peak, warmup_steps, total_steps, end_value=0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak` over min(warmup_steps, total_steps - 1) steps, then cosine decay to
  `end_value` at total_steps (pretraining and the evaluators' fine-tuning share it).

  optax's warmup_cosine_decay_schedule in jnp alone: its arguments may be traced scalars as well as numbers, so
  the train step can take them as arguments (make_train_step) instead of compiling them in.
  """
  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warmup = jnp.minimum(warmup_steps, jnp.maximum(total_steps - 1, 0)).astype(jnp.float32)
    decay = jnp.maximum(total_steps, warmup + 1) - warmup
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count - warmup, decay) / decay))
    return jnp.where(count < warmup, peak * count / jnp.maximum(warmup, 1.0),
                     end_value + (peak - end_value) * cosine)

  return schedule


def schedule_args(cfg: ml_collections.ConfigDict, total_steps: int) -> dict[str, np.ndarray]:
  """warmup_cosine's arguments for an optim config (see default_optim_config) and a run length."""
  return {"peak": np.float32(cfg.lr), "warmup_steps": np.float32(cfg.warmup_steps),
          "total_steps": np.float32(total_steps), "end_value": np.float32(cfg.lr * cfg.end_lr_fraction)}


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The pretraining schedule of an optim config (see default_optim_config)."""
  return warmup_cosine(**schedule_args(cfg, total_steps))


def clip_params(bounds: Sequence[tuple[str, float, float]]) -> optax.GradientTransformation:
  """Rewrites the update u of each parameter p whose path matches a (pattern, low, high) rule into
  clip(p + u, low, high) - p, so that applying it lands the parameter inside [low, high]; other leaves pass.

  The last transformation of the chain: the train step's optax.apply_updates then does the clamp that open_clip
  does in place after optimizer.step(), with no change to the step itself. Paths are read from the params the
  update is given, so it also works inside optax.multi_transform, where frozen leaves are masked out.
  """
  rules = [(re.compile(pattern), float(low), float(high)) for pattern, low, high in bounds]

  def update_fn(updates, state, params=None):
    if not rules:
      return updates, state
    if params is None:
      raise ValueError("clip_params needs the parameters: call tx.update(grads, state, params).")

    def clip(path, u, p):
      name = _join(path)
      for pattern, low, high in rules:
        if pattern.search(name):
          return (jnp.clip(p + u, low, high) - p).astype(u.dtype)
      return u

    return jax.tree_util.tree_map_with_path(clip, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, learning_rate: optax.Schedule,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW at `learning_rate` (e.g. schedule(cfg, total_steps)) over trainable leaves, then cfg.param_bounds;
  leaves matching cfg.freeze or `frozen` get no update (and no state), whatever their bounds."""
  decay_mask = match_rules(params, [(p, False) for p in cfg.no_decay], default=True)
  adamw = optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
  tx = optax.chain(*chain, adamw, clip_params(cfg.param_bounds))
  freeze = tuple(cfg.freeze) + tuple(frozen)
  if not freeze:
    return tx
  labels = match_rules(params, [(p, "frozen") for p in freeze], default="trainable")
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
