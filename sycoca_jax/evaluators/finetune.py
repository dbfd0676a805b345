"""Fine-tuning on a copy of the weights: the loop the probe (image classes) and VQA (answers) evaluators share.

Some towers of the model and a new linear head are trained together with AdamW (the head faster and without
weight decay) under a warmup + cosine schedule; the evaluated params are never changed. At every step all
processes draw the same example rows (seeded by (seed, step)) and each feeds its own slice of the global batch,
so they step together and the result does not depend on the process count.

Shape legend: B global batch, b = B / process count, F feature width, C head outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sycoca_jax import optim
from sycoca_jax import sharding
from sycoca_jax.evaluators import common


def finetune_optimizer(weight_decay: float, head_lr_mult: float) -> optax.GradientTransformation:
  """AdamW over a {'head': ..., <others>: ...} tree, with the learning rate fed in at every step.

  The head (a new linear layer) learns head_lr_mult times faster and without weight decay. The learning
  rate is a hyperparameter of the optimizer state (optax.inject_hyperparams; set it with `set_learning_rate`)
  rather than a schedule baked into the program, so one compiled step serves any number of steps.
  """

  def labels(tree):
    return {k: jax.tree.map(lambda _: "head" if k == "head" else "body", v) for k, v in tree.items()}

  def decay_mask(tree):
    return {k: jax.tree.map(lambda _: k != "head", v) for k, v in tree.items()}

  def make(learning_rate):
    return optax.chain(
        optax.scale_by_adam(),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.multi_transform({"head": optax.scale(head_lr_mult), "body": optax.identity()}, labels),
        optax.scale_by_learning_rate(learning_rate))

  return optax.inject_hyperparams(make)(learning_rate=0.0)


def set_learning_rate(opt_state, learning_rate):
  """The optimizer state of `finetune_optimizer` with its learning rate replaced (traceable)."""
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})


def zero_head(features_fn: Callable[..., jax.Array], num_outputs: int, *inputs) -> dict[str, jax.Array]:
  """A new linear head {'kernel' [F, C], 'bias' [C]} of zeros over the features features_fn(*inputs) [n, F].

  F is read from shapes (jax.eval_shape): nothing is computed.
  """
  width = jax.eval_shape(features_fn, *inputs).shape[-1]
  return {"kernel": jnp.zeros((width, num_outputs), jnp.float32), "bias": jnp.zeros((num_outputs,), jnp.float32)}


class Finetuner:
  """Trains chosen towers and a linear head on a loss; the jitted step is built once and reused every run.

  loss_fn(params, head, batch, *args) -> scalar, where batch holds this step's global arrays (those of
  `local_batch`, see `train`, and 'mask' float32 [B]) and args are passed to every step unchanged.
  """

  def __init__(self, loss_fn: Callable[..., jax.Array], *, batch_size: int, learning_rate: float,
               warmup_steps: int, weight_decay: float, head_lr_mult: float, config_key: str):
    """config_key: where the learning rate is set, named when the loss becomes NaN."""
    self.batch_size = common.round_batch_size(batch_size)
    self.learning_rate, self.warmup_steps, self.config_key = learning_rate, warmup_steps, config_key
    self.tx = tx = finetune_optimizer(weight_decay, head_lr_mult)

    def step(trainable, opt_state, frozen, batch, args, learning_rate):

      def loss(trainable):
        return loss_fn(dict(frozen) | dict(trainable["params"]), trainable["head"], batch, *args)

      value, grads = jax.value_and_grad(loss)(trainable)
      opt_state = set_learning_rate(opt_state, learning_rate)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value

    self._step = jax.jit(step)

  def train(self, params: Mapping[str, Any], head: dict[str, jax.Array], towers: Sequence[str], num_examples: int,
            local_batch: Callable[[np.ndarray], dict[str, np.ndarray]], steps: int, seed: int = 0,
            args: tuple = ()) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Returns (params, head) after `steps` steps that update `head` and params[t] for t in `towers`.

    local_batch(rows) gives this process's arrays (leading axis b) of the example rows `rows` of the training set
    (of `num_examples`); rows are drawn with replacement only when the set is smaller than the batch.
    """
    trainable = {"params": {k: params[k] for k in towers}, "head": head}
    frozen = {k: v for k, v in params.items() if k not in towers}
    opt_state = self.tx.init(trainable)
    schedule = optim.warmup_cosine(self.learning_rate, self.warmup_steps, steps)
    pc, pi = jax.process_count(), jax.process_index()
    b, layout, loss = self.batch_size // pc, common.data_sharding(params), None
    for k in range(steps):
      rows = np.random.default_rng([seed, k]).choice(num_examples, size=self.batch_size,
                                                     replace=self.batch_size > num_examples)
      local = dict(local_batch(rows[pi * b:(pi + 1) * b]), mask=np.ones(b, np.float32))
      trainable, opt_state, loss = self._step(trainable, opt_state, frozen, sharding.global_batch(local, layout),
                                              args, np.float32(schedule(k)))
    if loss is not None and not np.isfinite(float(loss)):
      raise FloatingPointError(f"Fine-tuning loss became {float(loss)}; lower {self.config_key}.")
    return dict(frozen) | dict(trainable["params"]), trainable["head"]
