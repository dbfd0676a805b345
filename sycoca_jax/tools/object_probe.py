r"""Can a config's image tower learn what the scenes draw? A supervised check, before any long run.

  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --steps=800
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --label=colour --steps=300
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --tower=cnn --steps=400
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py \
      "--config.data.scenes.backgrounds=('gradient',)" --size=large
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --clutter=all --steps=800
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --weights=/tmp/sycoca_tiny --frozen
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --weights=/tmp/sycoca_tiny --twins
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --weights=/tmp/sycoca_tiny --captioner
  python -m sycoca_jax.tools.object_probe --config=configs/sycoca_tiny.py --weights=/tmp/sycoca_tiny --words_head

Trains the config's ViT (model.vision, fresh weights) with a linear head on its pooled feature to name the one
object of single-object training scenes: its kind (8 shapes + 10 digits, chance ln 18 = 2.89 nats) or its
colour (12, chance 2.48 nats), with AdamW, the config's batch size and learning rate, on fresh scenes every
step (so the training loss is also a held-out loss). It prints the loss and accuracy, each averaged over the
last `--every` steps.

Contrastive and captioning objectives can teach the image tower at most what it can pick up from the pixels
within the run's budget; a direct label is the strongest signal there is. If this probe stays at chance for as
many examples as a pretraining run sees, the objectives are not what stops the tower from learning object
identity: the images are (resolution per object, clutter) or the tower is. `--tower=cnn` tells the two apart:
it trains a small reference CNN (`ReferenceCNN`: five 3x3 conv + BatchNorm + ReLU layers, two max-pools, a
global max-pool) on the same scenes, with the same optimiser and batches, in place of the ViT.

Is it the clutter? `--clutter` trains on the config's own scenes (data.scenes: 1-4 objects by default) and scores
the head every `--every` steps on 300 one-object test scenes (argmax over the 18 kinds): with `--clutter=all` the
head names every kind in the scene (one sigmoid per kind), with `--clutter=one` the kind of one of its objects,
drawn at random (softmax), a label like a caption that names one object of several.

What did pretraining teach the tower? `--weights=WORKDIR` starts the ViT from a run's latest checkpoint (the
run's own model config), and `--frozen` trains the linear head alone: a linear probe of what the tower's pooled
feature holds. `--frozen` without `--weights` probes a fresh initialisation's features, the baseline.

And the text tower? `--twins` embeds training captions and their false twins (the same sentence with one object
kind, attribute, relation or count changed: scenes.negative_caption) with the run's text tower and prints their
mean cosine per kind of change, beside the cosine of two unrelated captions: a tower that keeps the changed
word apart gives the twin a lower cosine than 1, one that has learned to ignore the word gives it ~1.

And the captioner? `--captioner` names the object of one-object test scenes by the run's caption likelihood: for
each image, log p("a <colour> <kind word>" | image) for every kind (a shape's best synonym; a digit's "digit 7",
"number 7" or "7"), the object's colour given, argmax over the 18 kinds. The prompts read as the training captions
do, colour before kind, where the zero-shot evaluator's "a circle" or "one circle" are sentences no caption has.

And a caption-words head (model.words_head)? `--words_head` names the kind and the colour of one-object test scenes
by the head's logits: each class's best word, standardised over the images, argmax over the classes.
"""

import dataclasses
import time
from collections.abc import Iterator
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from sycoca_jax import checkpoint, config_lib, pixels
from sycoca_jax.data import scenes as scenes_lib
from sycoca_jax.data import tokenizer_from_config
from sycoca_jax.models import sycoca

FLAGS = flags.FLAGS


def define_flags():
  """The command line, defined when the tool runs (not on import: several tools in one process, e.g. a test
  session, would define --config twice)."""
  config_flags.DEFINE_config_file("config", None, "Run config whose model.vision and data.scenes are probed.")
  flags.DEFINE_integer("steps", 800, "Training steps.")
  flags.DEFINE_integer("every", 50, "Print the mean loss / accuracy of every this many steps.")
  flags.DEFINE_enum("label", "kind", ["kind", "colour"], "What the head names: object kind or colour.")
  flags.DEFINE_enum("size", "", ["", "small", "medium", "large"], "Draw every object at this size (default: all).")
  flags.DEFINE_enum("clutter", "", ["", "all", "one"], "Train on the config's scenes (several objects), naming "
                    "every kind present (all) or one object's kind (one); scored on one-object test scenes.")
  flags.DEFINE_enum("tower", "vit", ["vit", "cnn"], "The config's ViT, or the reference CNN (ReferenceCNN).")
  flags.DEFINE_string("weights", None, "Start the ViT from this run's latest checkpoint (its model config).")
  flags.DEFINE_bool("frozen", False, "Train the linear head only; the tower's weights stay as they start.")
  flags.DEFINE_bool("twins", False, "Instead: the text tower's cosine between captions and their false twins.")
  flags.DEFINE_bool("captioner", False, "Instead: the captioner's kind accuracy on one-object test scenes.")
  flags.DEFINE_bool("words_head", False, "Instead: the caption-words head's kind and colour accuracy on one-object "
                    "test scenes.")
  flags.mark_flags_as_required(["config"])


class _Probe(nn.Module):
  """The config's ViT and a linear head on its pooled feature: images [B, S, S, 3] -> logits [B, C]."""
  image_encoder: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images):
    return nn.Dense(self.num_classes)(self.image_encoder(images)["pooled"])


class ReferenceCNN(nn.Module):
  """A small CNN with the inductive biases a ViT lacks (locality, translation-invariant max-pooling):
  images [B, S, S, 3] -> features [B, 128]. BatchNorm uses the batch's statistics (the probe only trains)."""

  @nn.compact
  def __call__(self, images):
    x = images
    for i, width in enumerate((32, 32, 64, 64, 128)):
      x = nn.Conv(width, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
      if i in (1, 3):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return {"pooled": x.max(axis=(1, 2))}


def _images(scenes: list, image_size: int) -> np.ndarray:
  """Rendered scenes, normalised: the towers here take the model's float input."""
  return np.stack([pixels.normalize(np.asarray(scenes_lib.render_scene(s, image_size))) for s in scenes])


def _batch(config, label: str, size: str, start: int, count: int, clutter: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Training scenes start .. start + count - 1 as normalised images and labels.

  Without `clutter`: one-object scenes, each labelled with its object's kind or colour. With it: the config's scenes
  (data.scenes' object counts), labelled with a multi-hot [count, 18] of the kinds present ("all") or the kind of one
  object ("one"), drawn by a generator seeded with the scene's index.
  """
  sc = config.data.scenes
  fewest, most = (sc.min_objects, sc.max_objects) if clutter else (1, 1)
  scenes = [scenes_lib.sample_scene(config.data.seed, "train", i, min_objects=fewest, max_objects=most,
                                    backgrounds=tuple(sc.backgrounds)) for i in range(start, start + count)]
  if size:
    scenes = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, size=size) for o in s.objects))
              for s in scenes]
  labels = []
  for i, scene in zip(range(start, start + count), scenes):
    kinds = [scenes_lib.KINDS.index(o.shape) for o in scene.objects]
    if clutter == "all":
      labels.append(np.isin(np.arange(len(scenes_lib.KINDS)), kinds).astype(np.float32))
    elif clutter == "one":
      labels.append(kinds[int(np.random.default_rng(i).integers(len(kinds)))])
    else:
      labels.append(kinds[0] if label == "kind" else scenes_lib.COLOUR_NAMES.index(scene.objects[0].colour))
  return _images(scenes, config.data.image_size), np.asarray(labels, np.float32 if clutter == "all" else np.int32)


def probe(config, steps: int, label: str = "kind", size: str = "", every: int = 50, tower: str = "vit",
          weights: Optional[str] = None, frozen: bool = False, clutter: str = "") -> Iterator[dict]:
  """Trains the probe, yielding one {'step', 'loss', 'accuracy', 'seconds', 'params'} row per `every` steps
  (with label="kind", also 'shape_accuracy' and 'digit_accuracy': the accuracy on the shapes and on the digits).

  tower: "vit", the config's image encoder, or "cnn", ReferenceCNN. weights: a run's workdir whose latest
  checkpoint the ViT starts from (built from that run's model config). frozen: only the linear head trains.
  clutter: "" trains on one-object scenes; "all" or "one" on the config's scenes, naming every kind present or one
  object's (label must be "kind"); each row's accuracy is then that on 300 one-object test scenes.
  """
  config_lib.validate(config)
  if clutter not in ("", "all", "one") or (clutter and label != "kind"):
    raise ValueError(f"clutter={clutter!r}: choose '', 'all' or 'one' (with label='kind', not {label!r}).")
  num_classes = len(scenes_lib.KINDS) if label == "kind" else len(scenes_lib.COLOUR_NAMES)
  towers = {"vit": lambda: sycoca.build_model(config.model).image_encoder, "cnn": ReferenceCNN}
  if tower not in towers:
    raise ValueError(f"tower={tower!r}: choose from {sorted(towers)}.")
  saved = None
  if weights:
    if tower != "vit":
      raise ValueError(f"weights={weights!r} start the ViT; tower={tower!r} has none to read.")
    run_config, saved, _ = checkpoint.load_params(weights)
    config = config.copy_and_resolve_references()
    config.model = run_config.model
    if run_config.model.vision.image_size != config.data.image_size:
      raise ValueError(f"weights={weights!r}: the run's tower takes {run_config.model.vision.image_size} px images,"
                       f" --config's data {config.data.image_size} px; set config.data.image_size to match.")
  model = _Probe(towers[tower](), num_classes)
  batch_size, image_size = config.global_batch_size, config.data.image_size
  variables = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((2, image_size, image_size, 3)))
  params = dict(variables["params"])
  if saved is not None:
    params["image_encoder"] = saved["image_encoder"]
  # A frozen tower is an argument of the step, not a parameter: no gradient is taken through it and no
  # optimizer state is kept for it.
  fixed = {"image_encoder": params.pop("image_encoder")} if frozen else {}
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.lr, min(config.optim.warmup_steps, steps // 4),
                                                steps)
  tx = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, fixed, opt_state, images, labels):
    def loss_fn(p):
      # BatchNorm's running statistics (the CNN's) are never read: the probe only trains.
      logits, _ = model.apply({**variables, "params": {**fixed, **p}}, images, mutable=["batch_stats"])
      if clutter == "all":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean(), logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    guess = logits.argmax(-1)
    # With every kind present as the label, a guess is right when it names one of them.
    correct = labels[jnp.arange(len(guess)), guess] > 0 if clutter == "all" else guess == labels
    return optax.apply_updates(params, updates), opt_state, loss, correct

  @jax.jit
  def predict(params, fixed, images):
    return model.apply({**variables, "params": {**fixed, **params}}, images, mutable=["batch_stats"])[0].argmax(-1)

  if clutter:  # the held-out one-object scenes every row is scored on
    tests = [scenes_lib.sample_scene(config.data.seed, "test", i, min_objects=1, max_objects=1,
                                     backgrounds=tuple(config.data.scenes.backgrounds)) for i in range(300)]
    test_images = _images(tests, image_size)
    test_labels = np.array([scenes_lib.KINDS.index(t.objects[0].shape) for t in tests])

  window, start = [], time.time()
  for i in range(steps):
    images, labels = _batch(config, label, size, i * batch_size, batch_size, clutter)
    params, opt_state, loss, correct = step(params, fixed, opt_state, images, labels)
    window.append((loss, correct, labels))
    if (i + 1) % every == 0 or i + 1 == steps:
      losses, correct = jax.device_get(([w[0] for w in window], [w[1] for w in window]))
      correct, seen = np.concatenate(correct), np.concatenate([w[2] for w in window])
      if clutter:
        seen = test_labels
        correct = np.concatenate([np.asarray(predict(params, fixed, test_images[j:j + batch_size]))
                                  for j in range(0, len(test_images), batch_size)]) == test_labels
      row = {"step": i + 1, "loss": float(np.mean(losses)), "accuracy": float(correct.mean()),
             "seconds": time.time() - start, "params": {**fixed, **params}}
      if label == "kind":  # the two halves of the kinds apart (KINDS = SHAPES + DIGITS; each drawn half the time)
        is_digit = seen >= len(scenes_lib.SHAPES)
        for name, where in (("shape_accuracy", ~is_digit), ("digit_accuracy", is_digit)):
          row[name] = float(correct[where].mean()) if where.any() else float("nan")
      yield row
      window = []


def twin_similarity(config, weights: Optional[str] = None, scenes: int = 100) -> dict[str, tuple[float, float, int]]:
  """{negative kind: (mean cosine of caption and twin, mean cosine of two unrelated captions, pairs)} of the text
  tower of `weights` (a run's workdir; its model config) or of a fresh `config` model, over the training
  captions of the first `scenes` train scenes."""
  if weights:
    run_config, params, _ = checkpoint.load_params(weights)
    config = config.copy_and_resolve_references()
    config.model, config.data = run_config.model, run_config.data
  model = sycoca.build_model(config.model)
  if not weights:
    params = sycoca.init_params(model, jax.random.PRNGKey(config.seed))
  tokenizer = tokenizer_from_config(config.data)
  embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method=sycoca.SyCoCa.encode_text)["embedding"])
  rows = {}
  for kind in scenes_lib.NEGATIVE_KINDS:
    source = scenes_lib.ScenesSource("train", hard_negatives=(kind,))
    pairs = [(c, n) for i in range(scenes) for c, n in zip(*source.caption_pairs(source.scene(i))) if c != n]
    captions, twins = (np.asarray(embed(params, tokenizer.encode(list(t)))) for t in zip(*pairs))
    unrelated = np.roll(captions, 1, axis=0)  # the caption of another scene (or another of the same scene's)
    rows[kind] = (float((captions * twins).sum(-1).mean()), float((captions * unrelated).sum(-1).mean()), len(pairs))
  return rows


def kind_words(kind: str) -> tuple[str, ...]:
  """How the training captions name a kind: a shape's synonyms, or a digit with or without its noun."""
  if kind in scenes_lib.DIGITS:
    return (f"digit {kind}", f"number {kind}", kind)
  return scenes_lib.SHAPE_WORDS[kind]


def _test_scenes(count: int, image_size: int) -> tuple[list, np.ndarray, np.ndarray]:
  """One-object test scenes 0 .. count - 1: the scenes, their uint8 images and their kinds (indices into KINDS)."""
  objects = [scenes_lib.sample_scene(0, "test", i, min_objects=1, max_objects=1) for i in range(count)]
  images = np.stack([np.asarray(scenes_lib.render_scene(s, image_size)) for s in objects])
  return objects, images, np.array([scenes_lib.KINDS.index(s.objects[0].shape) for s in objects])


def _kind_accuracies(scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
  """{'scores', 'truth', 'accuracy', 'shape_accuracy', 'digit_accuracy'} of the argmax of scores [scenes, 18]."""
  correct, is_digit = scores.argmax(1) == truth, truth >= len(scenes_lib.SHAPES)
  return {"scores": scores, "truth": truth, "accuracy": float(correct.mean()),
          "shape_accuracy": float(correct[~is_digit].mean()), "digit_accuracy": float(correct[is_digit].mean())}


def captioner_kinds(weights: str, scenes: int = 300) -> dict[str, Any]:
  """The captioner of `weights` (a run's workdir, latest checkpoint) naming the kind of one-object test scenes.

  Returns {'scores' [scenes, 18]: the best log p("a <colour> <word>" | image) over the kind's words, 'truth' [scenes]
  (indices into KINDS), 'accuracy', 'shape_accuracy', 'digit_accuracy'}.
  """
  from sycoca_jax import inference  # pylint: disable=g-import-not-at-top

  model = inference.load(weights)
  objects, images, truth = _test_scenes(scenes, model.image_size)
  colours = [s.objects[0].colour for s in objects]
  scores = np.stack([
      np.max([model.score(images, [f"a {c} {word}" for c in colours])["log_likelihood"] for word in kind_words(k)], 0)
      for k in scenes_lib.KINDS], axis=1)
  return _kind_accuracies(scores, truth)


def words_head_kinds(weights: str, scenes: int = 300) -> dict[str, Any]:
  """The caption-words head of `weights` (model.words_head; a run's workdir, latest checkpoint) naming the kind and
  the colour of one-object test scenes, each by its largest logit among that kind's (colour's) words.

  Each class's logit is standardised over the images first: the words' frequencies in the captions otherwise decide
  the argmax. Returns {'scores' [scenes, 18], 'truth' [scenes] (indices into KINDS), 'accuracy', 'shape_accuracy',
  'digit_accuracy', 'colour_accuracy'}.
  """
  from sycoca_jax import inference  # pylint: disable=g-import-not-at-top
  from sycoca_jax.models.sycoca import SyCoCa  # pylint: disable=g-import-not-at-top

  model = inference.load(weights)
  if "word_head" not in model.params:
    raise ValueError(f"{weights}: its model has no caption-words head (model.words_head).")
  objects, images, truth = _test_scenes(scenes, model.image_size)
  logits = np.asarray(model.model.apply({"params": model.params}, images, method=SyCoCa.word_logits), np.float64)
  # A phrase's last word names the class ("digit 7" -> "7").
  word_id = lambda phrase: model.tokenizer.words.index(phrase.split()[-1])

  def standardised(classes, words_of):
    best = np.stack([logits[:, [word_id(w) for w in words_of(c)]].max(1) for c in classes], 1)
    return (best - best.mean(0)) / np.maximum(best.std(0), 1e-12)

  scores = standardised(scenes_lib.KINDS, kind_words)
  colours = standardised(scenes_lib.COLOUR_NAMES, scenes_lib.COLOUR_WORDS.get)
  colour_truth = np.array([scenes_lib.COLOUR_NAMES.index(s.objects[0].colour) for s in objects])
  return {**_kind_accuracies(scores, truth), "colour_accuracy": float((colours.argmax(1) == colour_truth).mean())}


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.words_head:
    if not FLAGS.weights:
      raise app.UsageError("--words_head reads a run's caption-words head: give --weights=WORKDIR.")
    row = words_head_kinds(FLAGS.weights)
    print(f"caption-words head of {FLAGS.weights}, one-object test scenes ({len(row['truth'])}): each class by its "
          "best word's logit, standardised over the images")
    print(f"kind {100 * row['accuracy']:.1f} %: shapes {100 * row['shape_accuracy']:.1f} %, digits "
          f"{100 * row['digit_accuracy']:.1f} % (chance 5.6 %); colour {100 * row['colour_accuracy']:.1f} % "
          "(chance 8.3 %)")
    return
  if FLAGS.captioner:
    if not FLAGS.weights:
      raise app.UsageError("--captioner reads a run's captioner: give --weights=WORKDIR.")
    row = captioner_kinds(FLAGS.weights)
    print(f"captioner of {FLAGS.weights}, one-object test scenes ({len(row['truth'])}): kind named by "
          f"log p('a <colour> <kind>' | image)")
    print(f"accuracy {100 * row['accuracy']:.1f} %: shapes {100 * row['shape_accuracy']:.1f} %, digits "
          f"{100 * row['digit_accuracy']:.1f} % (chance 5.6 %)")
    return
  if FLAGS.twins:
    print(f"text tower of {FLAGS.weights or 'a fresh initialisation'}: mean cosine of training captions with")
    print(f"{'change':>10} {'their twin':>11} {'another caption':>16} {'pairs':>6}")
    for kind, (twin, other, n) in twin_similarity(config, FLAGS.weights).items():
      print(f"{kind:>10} {twin:>11.4f} {other:>16.4f} {n:>6}")
    return
  if FLAGS.clutter and FLAGS.size:
    raise app.UsageError("--size draws one-object scenes' objects; --clutter trains on the config's own scenes.")
  chance = np.log(len(scenes_lib.KINDS) if FLAGS.label == "kind" else len(scenes_lib.COLOUR_NAMES))
  v = config.model.vision
  if FLAGS.weights:
    tower = f"the ViT of {FLAGS.weights}"
  elif FLAGS.tower == "vit":
    tower = f"ViT patch {v.patch_size}, {v.stem} stem"
  else:
    tower = "reference CNN"
  tower += ", frozen (linear head only)" if FLAGS.frozen else ""
  sc = config.data.scenes
  trained_on = (f"{FLAGS.label} of one-object scenes" if not FLAGS.clutter else
                f"{'every kind' if FLAGS.clutter == 'all' else 'one kind'} of {sc.min_objects}-{sc.max_objects} object "
                f"scenes (accuracy: 300 one-object test scenes)")
  print(f"probe: {trained_on}, {config.data.image_size} px, {tower}, backgrounds "
        f"{tuple(config.data.scenes.backgrounds)}, size {FLAGS.size or 'all'}; batch {config.global_batch_size}, "
        f"lr {config.optim.lr}; chance " + (f"loss {chance:.2f}" if FLAGS.clutter != "all" else "accuracy 5.6 %"))
  kind = FLAGS.label == "kind"
  print(f"{'step':>6} {'loss':>7} {'accuracy':>9}" + (f" {'shapes':>7} {'digits':>7}" if kind else "") +
        f" {'seconds':>8}")
  for row in probe(config, FLAGS.steps, FLAGS.label, FLAGS.size, FLAGS.every, FLAGS.tower, FLAGS.weights,
                   FLAGS.frozen, FLAGS.clutter):
    groups = f" {100 * row['shape_accuracy']:>6.1f}% {100 * row['digit_accuracy']:>6.1f}%" if kind else ""
    print(f"{row['step']:>6} {row['loss']:>7.3f} {100 * row['accuracy']:>8.1f}%{groups} {row['seconds']:>8.0f}",
          flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
