"""Classification from image features: linear probes on frozen features, and full fine-tuning.

Methods (any subset, config `methods`):
  ridge     closed-form ridge regression on one-hot targets (features and targets centred, so the bias is not
            regularised); the L2 strength is chosen on a held-out fifth of the training set, then refit on
            all of it. Deterministic, seconds even for thousands of examples.
  logistic  scikit-learn's multinomial LogisticRegression on standardised features (C chosen the same way).
  finetune  the image encoder and a new linear head trained together with optax (AdamW, cosine schedule), on
            a copy of the weights: the evaluated params are never changed.

Shape legend: N examples, F feature width, C classes, B global batch, S image side.

Features (config `features`): 'embedding' (the normalised ITC embedding), 'pooled' (the projected CLS token
before normalisation) or 'tokens_mean' (mean of the final patch tokens, width D).

Metric functions (`ridge_fit`, `ridge_predict`, `select_ridge`, `logistic_probe`) take arrays, not models.

Config (config.evals.<name>, type='probe'):
  datasets        names (evaluators/datasets.py): sklearn_digits, lfw_subset, scenes_count, tfds:<name>
                  (scenes_count trains on `num_train` train scenes and tests on the test split; the others
                  are split class-stratified with `test_fraction`, and tfds sets use '<name>:train' /
                  '<name>:test')
  methods         ('ridge',) | ('logistic',) | ('finetune',) or several
  features, l2_grid, logistic_c_grid, test_fraction, num_train, max_examples, seed
  finetune        steps, batch_size, learning_rate, weight_decay, warmup_steps, head_lr_mult
  batch_size, cache_images, prefix (default 'probe')
Metrics: <prefix>/<set>_<method>_acc (test accuracy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sycoca_jax import evaluators
from sycoca_jax.evaluators import common
from sycoca_jax.evaluators import datasets as datasets_lib
from sycoca_jax.evaluators import finetune
from sycoca_jax.models.sycoca import SyCoCa

FEATURES = ("embedding", "pooled", "tokens_mean")
METHODS = ("ridge", "logistic", "finetune")

# ------------------------------------------------------------------------------------------------ linear probes


def ridge_fit(x: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge regression onto one-hot targets: x [N, F], labels [N] -> (W [F, C], b [C]).

  Minimises |x W + b - Y|^2 + l2 * N * |W|^2 (l2 is per example, so one grid fits any N). Solved in the
  smaller of the primal (F x F) and dual (N x N) forms, in float64.
  """
  x = np.asarray(x, np.float64)
  y = np.eye(num_classes)[np.asarray(labels)]
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  n, f = xc.shape
  reg = l2 * n
  if f <= n:
    w = np.linalg.solve(xc.T @ xc + reg * np.eye(f), xc.T @ yc)
  else:  # dual: W = X^T (X X^T + reg I)^-1 Y
    w = xc.T @ np.linalg.solve(xc @ xc.T + reg * np.eye(n), yc)
  return w, y_mean - x_mean @ w


def ridge_predict(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Class scores [N, C]."""
  return np.asarray(x, np.float64) @ w + b


def _holdout(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  fit, val = datasets_lib.stratified_split(labels, 0.2, seed)
  if len(val) == 0 or len(np.unique(labels[fit])) < len(np.unique(labels)):
    everything = np.arange(len(labels))  # too small to hold anything out: select on the fit itself
    return everything, everything
  return fit, val


def select_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, grid: Sequence[float],
                 seed: int = 0) -> float:
  """The L2 strength of `grid` with the best accuracy on a stratified held-out fifth of (x, labels)."""
  fit, val = _holdout(labels, seed)
  scores = []
  for l2 in grid:
    w, b = ridge_fit(x[fit], labels[fit], num_classes, l2)
    scores.append(np.mean(ridge_predict(x[val], w, b).argmax(-1) == labels[val]))
  return float(grid[int(np.argmax(scores))])  # first (smallest) of equals


def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c_grid: Sequence[float],
                   seed: int = 0) -> np.ndarray:
  """Predicted test labels of a multinomial logistic regression; C picked on a held-out fifth of train."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top

  scaler = StandardScaler().fit(x_train)
  x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

  def model(c):
    return LogisticRegression(C=c, max_iter=2000, random_state=seed)

  fit, val = _holdout(y_train, seed)
  if len(c_grid) > 1:
    scores = [model(c).fit(x_train[fit], y_train[fit]).score(x_train[val], y_train[val]) for c in c_grid]
    best = c_grid[int(np.argmax(scores))]
  else:
    best = c_grid[0]
  return model(best).fit(x_train, y_train).predict(x_test)


# ------------------------------------------------------------------------------------------------ model


def image_features(module: SyCoCa, images, *, features: str = "embedding"):
  """[B, S, S, 3] -> [B, F] with F = E ('embedding', 'pooled') or D ('tokens_mean')."""
  out = module.encode_image(images)
  if features == "tokens_mean":
    return out["tokens"].astype(jnp.float32).mean(axis=1)
  return out[features].astype(jnp.float32)


def default_config() -> ml_collections.ConfigDict:
  return evaluators.eval_config(
      "probe", datasets=("sklearn_digits", "lfw_subset", "scenes_count"), methods=("ridge",),
      features="embedding", l2_grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
      logistic_c_grid=(0.01, 0.1, 1.0, 10.0), test_fraction=0.5, num_train=2000, max_examples=0, seed=0,
      batch_size=64, cache_images=True,
      finetune=ml_collections.ConfigDict(dict(steps=200, batch_size=64, learning_rate=1e-4, weight_decay=0.05,
                                               warmup_steps=20, head_lr_mult=10.0)))


@evaluators.register("probe", default_config)
class Probe:
  """Linear-probe / fine-tuned classification accuracy on labelled image sets."""

  def __init__(self, model: SyCoCa, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
               prefix: str):
    self.model, self.cfg, self.prefix = model, cfg, prefix
    if cfg.features not in FEATURES:
      raise ValueError(f"evals.{self.prefix}.features={cfg.features!r}: use one of {FEATURES}.")
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
      raise ValueError(f"evals.{self.prefix}.methods: unknown {sorted(unknown)}; use any of {METHODS}.")
    self.batch_size = common.round_batch_size(cfg.batch_size)
    self.sets = []  # (name, train ImageSet, test ImageSet)
    for name in cfg.datasets:
      if name == "scenes_count":
        train = datasets_lib.scenes_count(data_config, "train", cfg.max_examples or cfg.num_train)
        test = datasets_lib.scenes_count(data_config, "test", cfg.max_examples)
      elif name.startswith("tfds:"):
        train = datasets_lib.load(f"{name}:train", data_config, max_examples=cfg.max_examples)
        test = datasets_lib.load(f"{name}:test", data_config, max_examples=cfg.max_examples)
      else:
        whole = datasets_lib.load(name, data_config, max_examples=cfg.max_examples)
        train_idx, test_idx = datasets_lib.stratified_split(whole.labels, cfg.test_fraction, cfg.seed)
        train, test = whole.subset(train_idx), whole.subset(test_idx)
      train.cache = test.cache = cfg.cache_images
      self.sets.append((name.replace(":", "_"), train, test))
    fn = functools.partial(image_features, features=cfg.features)
    self._apply_features = lambda params, images: model.apply({"params": params}, images, method=fn)
    self._feature_fn = jax.jit(self._apply_features)

    def loss_fn(params, head, batch):
      logits = self._apply_features(params, batch["image"]) @ head["kernel"] + head["bias"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return jnp.sum(ce * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0)

    ft = cfg.finetune
    self.finetuner = finetune.Finetuner(
        loss_fn, batch_size=ft.batch_size, learning_rate=ft.learning_rate, warmup_steps=ft.warmup_steps,
        weight_decay=ft.weight_decay, head_lr_mult=ft.head_lr_mult,
        config_key=f"evals.{prefix}.finetune.learning_rate")

  def finetune_copy(self, params, train_set: datasets_lib.ImageSet):
    """(params, head) after cfg.finetune.steps steps on the image encoder + a new linear head (a copy)."""
    size = self.model.image_encoder.image_size
    head = finetune.zero_head(self._apply_features, train_set.num_classes, params, jnp.zeros((1, size, size, 3)))

    def local_batch(rows):
      return {"image": train_set.images(rows), "label": train_set.labels[rows]}

    return self.finetuner.train(params, head, ("image_encoder",), len(train_set), local_batch,
                                int(self.cfg.finetune.steps), self.cfg.seed)

  def features(self, params, image_set: datasets_lib.ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """(features [N', F], labels [N']) of the examples that could be read."""
    batches = image_set.batches(self.batch_size, sharding=common.data_sharding(params))
    out = common.collect(lambda b: {"f": self._feature_fn(params, b["image"])}, batches, len(image_set))
    return out["f"][out["valid"]], image_set.labels[out["valid"]]

  def run(self, params) -> dict[str, float]:
    cfg, out = self.cfg, {}
    for name, train, test in self.sets:
      frozen = None
      for method in cfg.methods:
        if method in ("ridge", "logistic"):
          if frozen is None:
            frozen = self.features(params, train) + self.features(params, test)
          x_train, y_train, x_test, y_test = frozen
          if method == "ridge":
            l2 = select_ridge(x_train, y_train, train.num_classes, tuple(cfg.l2_grid), cfg.seed)
            w, b = ridge_fit(x_train, y_train, train.num_classes, l2)
            predicted = ridge_predict(x_test, w, b).argmax(-1)
          else:
            predicted = logistic_probe(x_train, y_train, x_test, tuple(cfg.logistic_c_grid), cfg.seed)
        else:
          tuned, head = self.finetune_copy(params, train)
          x_test, y_test = self.features(tuned, test)
          predicted = (x_test @ np.asarray(head["kernel"]) + np.asarray(head["bias"])).argmax(-1)
        out[f"{self.prefix}/{name}_{method}_acc"] = float(np.mean(predicted == y_test))
    return out
