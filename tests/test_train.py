"""The trainer end to end: equivalence across device and process layouts, kill / resume, preemption,
non-finite steps, bad configs, a single compile, and exact gradient accumulation."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from configs import common
from sycoca_jax import checkpoint, config_lib, losses, metrics, optim, pixels, sharding, train
from sycoca_jax.models import sycoca
from tests import distributed
from tests.helpers import copy_run
from tests.helpers import small_train_config
from tests.helpers import trained_run_config


def _run(**spec):
  proc = distributed.spawn_train_worker(**spec)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(workdir):
  rows = [r for r in metrics.read_jsonl(workdir) if "loss" in r]
  return {r["step"]: r["loss"] for r in rows}


def _params(workdir, step=None):
  return checkpoint.load_params(workdir, step)[1]


def _wait_for(predicate, proc, timeout=300):
  t = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"worker exited early: {proc.stdout.read()[-3000:]}")
    if time.time() - t > timeout:
      raise TimeoutError
    time.sleep(0.05)


def _two_processes_and_one(tmp_path, overrides):
  """Trains `overrides` in tmp_path/two (two processes of two devices over loopback) and tmp_path/one (one device)."""
  port = distributed.free_port()
  procs = [distributed.spawn_train_worker(workdir=str(tmp_path / "two"), devices=2, num_processes=2, process_id=i,
                                          port=port, overrides=overrides) for i in range(2)]
  outs = [distributed.drain(p, timeout=600) for p in procs]
  _run(workdir=str(tmp_path / "one"), devices=1, overrides=overrides)  # while the two processes run
  for p, out in zip(procs, outs):
    log = out.result()
    assert p.returncode == 0, log[-3000:]


@pytest.mark.slow(reason="three training subprocesses, two of them over loopback")
def test_same_losses_on_1_device_8_devices_and_2_processes(tmp_path, trained_run):
  """The global batch and the math do not depend on how the work is laid out."""
  overrides = trained_run_config().to_dict()  # the shared trained_run is the 8-device run
  overrides = {k: overrides[k] for k in ("total_steps", "ckpt_steps", "async_checkpointing")}
  _two_processes_and_one(tmp_path, overrides)
  one, eight, two = _losses(tmp_path / "one"), _losses(trained_run), _losses(tmp_path / "two")
  assert sorted(one) == [1, 2] and sorted(eight) == [1, 2] and sorted(two) == [1, 2]
  for step in one:
    np.testing.assert_allclose(eight[step], one[step], rtol=2e-5)
    np.testing.assert_allclose(two[step], one[step], rtol=2e-5)
  assert one[2] != one[1]  # the runs really trained


@pytest.mark.slow(reason="two training subprocesses over loopback and one on a single device")
def test_the_words_head_trains_and_ranks_patches_alike_on_two_processes(tmp_path):
  """The caption-words head as a pod runs it (its weight decaying, its gradient centred over the global batch, its
  class activation map choosing the masks, the masking evaluator at a cadence): two processes log the losses and
  mask metrics of one device."""
  overrides = {"total_steps": 2, "ckpt_steps": 2, "model.words_head": True, "loss.words_weight": 2.0,
               "loss.words_vocab": "nouns", "loss.words_decay_steps": 2, "model.masking.score": "words",
               "model.words_grad": "centred",
               "evals.masking.log_steps": 2, "evals.masking.max_examples": 8, "evals.masking.batch_size": 8}
  overrides.update({f"evals.{name}.log_steps": 0 for name in ("retrieval", "zeroshot", "captioning")})
  _two_processes_and_one(tmp_path, overrides)
  rows = {name: metrics.read_jsonl(tmp_path / name) for name in ("one", "two")}
  logged = {name: {r["step"]: r for r in rs if "loss" in r} for name, rs in rows.items()}
  assert sorted(logged["one"]) == sorted(logged["two"]) == [1, 2]
  for step in (1, 2):
    for key in ("loss", "words_loss", "words_weight", "mask/mim_hidden_score"):
      np.testing.assert_allclose(logged["two"][step][key], logged["one"][step][key], rtol=2e-5)
  # Each update's words weight is the schedule's at the state's step: 2 at step 0, 1 at step 1 of a 2-step decay.
  np.testing.assert_allclose([logged["one"][s]["words_weight"] for s in (1, 2)], [2.0, 1.0], rtol=1e-6)
  mask = {name: next(r for r in rs if "masking/ic_object_recall" in r) for name, rs in rows.items()}
  assert mask["one"]["masking/num_pairs"] > 0
  for key in ("masking/ic_object_recall", "masking/ic_object_recall_random", "masking/num_pairs"):
    np.testing.assert_allclose(mask["two"][key], mask["one"][key], rtol=1e-5)


@pytest.mark.slow(reason="three training subprocesses with input worker processes")
def test_sigkill_then_resume_gives_the_uninterrupted_parameters(tmp_path):
  _run(workdir=str(tmp_path / "straight"), devices=2)  # the scenes decode in-process by default
  killed = tmp_path / "killed"
  workers = {"data.num_workers": 2}  # the killed and resumed runs decode in 2 input worker processes
  proc = distributed.spawn_train_worker(workdir=str(killed), devices=2, batch_delay=0.3, overrides=workers)
  _wait_for(lambda: os.path.isdir(killed / "checkpoints" / "2"), proc)
  proc.send_signal(signal.SIGKILL)  # no chance to clean up
  proc.wait()
  assert checkpoint.Checkpointer(str(killed)).latest_step() < 6
  _run(workdir=str(killed), devices=2, overrides=workers)
  want, got = _params(tmp_path / "straight", 6), _params(killed, 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), want, got)
  # The resumed run logged every step once, with the losses of the uninterrupted run.
  straight = _losses(tmp_path / "straight")
  resumed = _losses(killed)
  for step in straight:
    np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-6)


@pytest.mark.slow(reason="a training subprocess, stopped by a signal")
def test_sigterm_checkpoints_the_current_step(tmp_path):
  workdir = tmp_path / "term"
  proc = distributed.spawn_train_worker(workdir=str(workdir), devices=1, batch_delay=0.3,
                overrides={"total_steps": 1000, "ckpt_steps": 500})
  _wait_for(lambda: os.path.exists(workdir / "metrics.jsonl") and max(_losses(workdir) or [0]) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "PREEMPTED" in out, out[-3000:]
  step = checkpoint.Checkpointer(str(workdir)).latest_step()
  assert step is not None and 3 <= step < 500  # not a cadence step: the step it was at
  assert max(_losses(workdir)) == step


@pytest.mark.slow(reason="a training subprocess")
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
  workdir = tmp_path / "nan"
  # It stops at step 5; 1000 steps make its train step the SIGTERM test's program, compiled once for both.
  proc = distributed.spawn_train_worker(workdir=str(workdir), devices=1, nan_from_step=3,
                overrides={"ckpt_steps": 1, "max_bad_steps": 3, "total_steps": 1000})
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 3 and "3 steps in a row" in out, out[-3000:]
  rows = {r["step"]: r for r in metrics.read_jsonl(workdir) if "loss" in r}
  assert rows[2]["nonfinite"] == 0 and rows[3]["nonfinite"] == 1
  # Saves are due every step, but none is made during the non-finite streak: the last good one is kept.
  assert checkpoint.Checkpointer(str(workdir)).manager.all_steps() == [1, 2]


# Weights that are merely huge, weights that overflow to inf.
@pytest.mark.parametrize("lr", [1e8, 1e30])
@pytest.mark.slow(reason="trains twice (resumed and from scratch) until the guard stops the run")
def test_blown_up_weights_are_never_checkpointed(tmp_path, trained_run, lr):
  workdir = str(copy_run(trained_run, tmp_path / "w"))  # checkpoints at steps 1 and 2
  good = _params(workdir, 2)
  # A finite loss at good weights takes a huge update: the bad-step guard does not see it, the save check does.
  config = small_train_config(total_steps=6, async_checkpointing=False, **{"optim.lr": lr})
  with pytest.raises(train.TooManyBadSteps,
                     match=r"Step 4: the parameter norm is .* at step 2 .* last good checkpoint, step 2, is kept"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint.Checkpointer(workdir).manager.all_steps() == [1, 2]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 2), good)
  # From the start: nothing is checkpointed at all.
  fresh = str(tmp_path / "fresh")
  with pytest.raises(train.TooManyBadSteps, match=r"Step 2: .* at initialisation .* no checkpoint was written"):
    train.train_and_evaluate(config, fresh)
  assert checkpoint.Checkpointer(fresh).manager.all_steps() == []


@pytest.mark.parametrize("key,value,message", [
    ("optim.lrr", 1.0, r"config.optim.lrr: unknown config key. Did you mean config.optim.lr\?"),
    ("model.vision.image_size", 36, r"config.model.vision.image_size: 36 is not divisible by vision.patch_size"),
    ("global_batch_size", 12, r"config.global_batch_size: 12 .* not divisible by the 8 devices"),
    ("model.masking.mim_ratio", 1.0, r"config.model.masking.mim_ratio: 1.0 must be in \(0, 1\)"),
    ("model.masking.ic_ratio", -0.5, r"config.model.masking.ic_ratio: -0.5 must be in \(0, 1\)"),
])
def test_bad_config_fails_before_compiling_and_names_the_key(tmp_path, key, value, message):
  config = small_train_config()
  if key.endswith("lrr"):  # an unknown key, as a config file could hold it
    config.optim.lrr = value
  else:
    config_lib.set_by_path(config, key, value)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")  # failed before touching anything


@pytest.mark.slow(reason="resumes and trains the shared tiny run")
def test_train_step_compiles_once(tmp_path, trained_run, monkeypatch):
  traces = []
  make = losses.make_grad_fn

  def counting(*args, **kwargs):
    inner = make(*args, **kwargs)

    def grad_fn(*a):
      traces.append(1)
      return inner(*a)

    return grad_fn

  monkeypatch.setattr(train.losses, "make_grad_fn", counting)
  # Resumed at step 2 of 4: the restored state feeds the step it was saved from without a second trace.
  workdir = copy_run(trained_run, tmp_path / "once")
  train.train_and_evaluate(trained_run_config(total_steps=4, ckpt_steps=100, profile_steps=(3, 4)), str(workdir))
  assert len(traces) == 1
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  # The profiler window left its trace in the workdir.
  assert any(f.endswith(".xplane.pb") for _, _, files in os.walk(workdir / "profile") for f in files)


@pytest.mark.slow(reason="compiles and runs the train step")
def test_logged_learning_rate_is_the_one_the_optimizer_used():
  """A skipped (non-finite) step does not advance the optimizer, so the rate logged after it must not run ahead."""
  config = small_train_config()  # 2 warm-up steps: the rate differs at each of the first steps
  num_steps = config_lib.total_steps(config)
  mesh = sharding.make_mesh(config.mesh)
  step = train.make_train_step(config, sycoca.build_model(config.model), mesh, num_steps)
  state = step.init(jax.random.PRNGKey(0))
  from sycoca_jax.data import build_train_iterator  # pylint: disable=g-import-not-at-top
  local = next(build_train_iterator(config.data, global_batch_size=16, seed=0, process_index=0, process_count=1))
  # Normalised on the host: uint8 pixels cannot be NaN (float batches pass the step's normalisation untouched).
  good = {"image": pixels.normalize(local["image"]), "text": local["text"]}
  bad = dict(good, image=np.full_like(good["image"], np.nan))
  logged = []
  for batch in (good, bad, good):
    state, aux = step.step(state, sharding.global_batch(batch, mesh), step.schedule_args)
    logged.append(float(aux["learning_rate"]))
  schedule = optim.schedule(config.optim, num_steps)
  # Updates 1 and 3 ran with the optimizer's counts 0 and 1; step 2 was skipped.
  np.testing.assert_allclose(logged, [schedule(0), schedule(1), schedule(1)])
  assert schedule(1) != schedule(2)


@pytest.mark.slow(reason="compiles the full-batch and the accumulated gradient")
@pytest.mark.parametrize("contrastive", losses.CONTRASTIVE)
def test_gradient_accumulation_is_exact(contrastive):
  """Micro-batching (with contrastive negatives from the whole batch, sharded over the 8 devices: the ring for
  the sigmoid loss) gives the full-batch gradient of the dense formula on one device."""
  # The softmax case with the twin terms and SPARC's token term on: their means over the batch's twins, and over
  # each caption's tokens, are exact too (FILIP's forms score captions against the whole batch's images, which
  # micro-batches would split: the config refuses them with accumulation).
  twins = {"data.scenes.hard_negatives": ("object",), "loss.hard_negative_weight": 0.5, "loss.twin_text_weight": 0.5,
           "loss.token_weight": 0.5, "loss.token_loss": "sparc"}
  # The sigmoid case with the caption-words head (one softmax over the nouns, one over the colour words): its mean over
  # the captions that name one is exact too, and its weight, decaying over the run, is the step's on both paths.
  nouns = {"model.words_head": True, "loss.words_weight": 0.5, "loss.words_vocab": "nouns_colours",
           "loss.words_softmax": "groups", "loss.words_decay_steps": 4}
  config = small_train_config(**{"loss.contrastive": contrastive, **(twins if contrastive == "softmax" else nouns)})
  model = sycoca.build_model(config.model).clone(**losses.contrastive_init(config.loss))
  params = sycoca.init_params(model, jax.random.PRNGKey(0))
  from sycoca_jax.data import build_train_iterator  # pylint: disable=g-import-not-at-top
  local = next(build_train_iterator(config.data, global_batch_size=16, seed=0, process_index=0, process_count=1))
  batch = {k: local[k] for k in ("image", "text", "hard_negative") if k in local}
  if config.loss.words_weight:
    # Six captions of the first micro-batch (even rows) lose their nouns and colours: the micro-batches then hold
    # different numbers of captions that count, and only a mean weighted by those counts is the full batch's.
    nouns = losses.words_vocab("nouns_colours", config.model.text.vocab_size)
    blank = (np.arange(16) % 2 == 0) & (np.arange(16) < 12)
    batch["text"] = np.where(blank[:, None] & (nouns[batch["text"]] > 0), 3, batch["text"])
  step = np.int32(1)
  full, aux_full = jax.jit(losses.make_grad_fn(model, config.loss, 1))(params, batch, jax.random.PRNGKey(0), step)
  mesh = sharding.make_mesh(config.mesh)
  acc, aux_acc = jax.jit(losses.make_grad_fn(model, config.loss, 2, mesh))(
      params, sharding.global_batch(batch, mesh), jax.random.PRNGKey(0), step)
  extra = (("hard_negative_loss", "twin_text_loss", "token_loss") if "hard_negative" in batch
           else ("words_loss", "word_captions", "words_weight"))
  if config.loss.words_weight:
    np.testing.assert_allclose(aux_acc["words_weight"], 0.5 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-6)
  for k in ("loss", "contrastive_loss", "caption_loss", "mim_loss") + extra:
    np.testing.assert_allclose(aux_acc[k], aux_full[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-6), full, acc)


@pytest.mark.slow(reason="compiles and runs the tiny train step")
def test_sigmoid_loss_starts_at_siglip_values_and_learns_its_bias():
  config = small_train_config(**{"loss.contrastive": "sigmoid"})
  mesh = sharding.make_mesh(config.mesh)
  step = train.make_train_step(config, sycoca.build_model(config.model), mesh, config_lib.total_steps(config))
  state = step.init(jax.random.PRNGKey(0))
  np.testing.assert_allclose([float(state["params"]["logit_scale"]), float(state["params"]["logit_bias"])],
                             [np.log(10.0), -10.0], rtol=1e-6)
  from sycoca_jax.data import build_train_iterator  # pylint: disable=g-import-not-at-top
  local = next(build_train_iterator(config.data, global_batch_size=16, seed=0, process_index=0, process_count=1))
  batch = sharding.global_batch({"image": local["image"], "text": local["text"]}, mesh)
  for _ in range(2):  # the first update's learning rate is 0 (warmup)
    state, aux = step.step(state, batch, step.schedule_args)
    # One step in flight at a time, as the trainer's log_steps=1 keeps it. The eight CPU devices share one thread
    # pool: with several steps' rings of collectives queued on a loaded machine, a rendezvous can wait past
    # XLA's 40 s termination timeout, which aborts the process (this test's worker crashed so, now and then).
    jax.block_until_ready(aux)
  assert np.isfinite(float(aux["contrastive_loss"])) and float(aux["logit_bias"]) == -10.0
  assert float(state["params"]["logit_bias"]) != -10.0   # trained (not frozen, as under the softmax loss)


@pytest.mark.slow(reason="compiles and runs the tiny train step")
def test_a_head_no_objective_trains_gets_no_update():
  """A caption-words head with loss.words_weight 0 stays as initialised (no update, no weight decay), like the
  other towers of switched-off objectives, while the image tower trains."""
  config = small_train_config(**{"model.words_head": True, "loss.mim_weight": 0.0})
  mesh = sharding.make_mesh(config.mesh)
  step = train.make_train_step(config, sycoca.build_model(config.model), mesh, config_lib.total_steps(config))
  state = step.init(jax.random.PRNGKey(0))
  before = jax.device_get(state["params"])
  from sycoca_jax.data import build_train_iterator  # pylint: disable=g-import-not-at-top
  local = next(build_train_iterator(config.data, global_batch_size=16, seed=0, process_index=0, process_count=1))
  batch = sharding.global_batch({"image": local["image"], "text": local["text"]}, mesh)
  for _ in range(2):  # the first update's learning rate is 0 (warmup)
    state, aux = step.step(state, batch, step.schedule_args)
    jax.block_until_ready(aux)
  after = jax.device_get(state["params"])
  for name in ("word_head", "image_decoder"):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(after["image_encoder"]["proj"], before["image_encoder"]["proj"])


def test_durations_in_any_unit():
  c = config_lib.default_config()
  c.global_batch_size = 100
  c.total_steps = 7
  assert config_lib.total_steps(c) == 7
  c.total_steps, c.total_examples = 0, 1000
  assert config_lib.total_steps(c) == 10
  c.total_examples, c.total_epochs, c.num_train_examples = 0, 2.0, 550
  assert config_lib.total_steps(c) == 11
  assert config_lib.every(10, 5, 12) and config_lib.every(12, 5, 12) and not config_lib.every(11, 5, 12)


@pytest.mark.slow(reason="trains a run initialised from the shared tiny run")
def test_init_from_another_run_with_a_frozen_tower(tmp_path, trained_run):
  """config.init_from copies the named towers; optim.freeze keeps one fixed while the rest trains."""
  source = str(trained_run)  # only read
  target = str(tmp_path / "target")
  config = trained_run_config()
  config.init_from.workdir = source
  config.init_from.towers = ("image_encoder", "text_encoder")
  config.optim.freeze = (r"^image_encoder/",)
  train.train_and_evaluate(config, target)
  src, dst = _params(source), _params(target)
  jax.tree.map(np.testing.assert_array_equal, src["image_encoder"], dst["image_encoder"])  # copied, then frozen
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), src["text_encoder"],
                                       dst["text_encoder"]))
  assert any(moved)  # copied, then trained on


@pytest.mark.slow(reason="needs the shared tiny trained run")
def test_resuming_with_total_steps_below_the_checkpoint_fails(tmp_path, trained_run):
  workdir = str(copy_run(trained_run, tmp_path / "w"))
  with pytest.raises(ValueError, match=r"config.total_steps: the run now lasts 1 steps, but .* at step 2"):
    train.train_and_evaluate(trained_run_config(total_steps=1), workdir)


@pytest.mark.slow(reason="resumes and trains the shared tiny run")
def test_resume_compares_the_config_with_the_checkpoints(tmp_path, trained_run, caplog):
  workdir = str(copy_run(trained_run, tmp_path / "w"))
  other = trained_run_config(**{"model.embed_dim": 64})
  common.apply_variant(other, "coca")
  with pytest.raises(ValueError, match=r"holds step 2 of a run with another model or objective; changed: "
                                       r"loss.mim_weight \(1.0 -> 0.0\), .*model.embed_dim \(32 -> 64\)"):
    train.train_and_evaluate(other, workdir)
  # A new length is allowed, and explained.
  train.train_and_evaluate(trained_run_config(total_steps=4), workdir)
  assert "total_steps (2 -> 4). The learning-rate schedule is recomputed" in caplog.text
  assert checkpoint.Checkpointer(workdir).latest_step() == 4


@pytest.mark.slow(reason="resumes and trains the shared tiny run")
def test_resumed_run_logs_each_step_once(tmp_path, trained_run):
  workdir = copy_run(trained_run, tmp_path / "w")
  # What a run killed after its step-2 checkpoint leaves: rows of steps the resumed run logs again.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n" + json.dumps({"step": 4, "loss": -1.0}) + "\n")
  train.train_and_evaluate(trained_run_config(total_steps=4), str(workdir))
  rows = metrics.read_jsonl(workdir)
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows if "loss" in r)
  assert sum("hparams" in r for r in rows) == 1


@pytest.mark.slow(reason="needs the shared tiny trained run")
def test_checkpoint_without_its_metadata_is_reported_as_damaged(tmp_path, trained_run):
  workdir = copy_run(trained_run, tmp_path / "w")
  for step in (1, 2):
    os.remove(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
  with pytest.raises(checkpoint.CheckpointUnreadable, match=r"checkpoints/2 is damaged: state/_METADATA is missing"):
    train.train_and_evaluate(trained_run_config(total_steps=4), str(workdir))


@pytest.mark.slow(reason="traces and lowers the train step four times")
def test_runs_of_another_length_or_peak_rate_share_one_train_step_program():
  """The schedule's numbers are arguments of the step: a new run length (a resume that extends a run) or peak rate
  (an lr sweep) lowers to the same program, one persistent-cache entry; the optimizer's constants still count."""
  def lowered(**overrides):
    config = small_train_config(**overrides)
    mesh = sharding.make_mesh(config.mesh)
    step = train.make_train_step(config, sycoca.build_model(config.model), mesh, config_lib.total_steps(config))
    return step.step.lower(step.abstract_state, step.abstract_batch, step.schedule_args).as_text()

  base = lowered()
  assert lowered(total_steps=1000, **{"optim.lr": 3e-2, "optim.warmup_steps": 50}) == base
  assert lowered(**{"optim.weight_decay": 0.123}) != base
