"""SyCoCa pretraining: one linear story from config to checkpoints.

  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny

Sections, in order: setup -> input pipeline -> model, loss, optimizer and the train step (its state described
abstractly, with shardings) -> resume or initialise (materialised already split over the mesh) -> evaluators ->
the loop. `make_train_step`, below the loop, builds the step that tools/benchmark.py and tools/aot.py also run.
Fork this file rather than subclass it.
"""

import atexit
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from sycoca_jax import checkpoint as ckpt_lib
from sycoca_jax import config_lib, evaluators, losses, metrics, optim, paths, pixels, preemption, sharding
from sycoca_jax.data import build_train_iterator
from sycoca_jax.data.prefetch import DevicePrefetcher
from sycoca_jax.models import sycoca
from sycoca_jax.models.vit import patchify, unpatchify

TOWER_OF_HEAD = {"itc": ("logit_scale", "logit_bias"), "ic": ("text_decoder",), "mim": ("image_decoder",),
                 "words": ("word_head",)}


class Preempted(Exception):
  """Raised after a SIGTERM (to any host) once every host has checkpointed the step they agreed on."""


class TooManyBadSteps(FloatingPointError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the last logged metrics."""
  # ---------------------------------------------------------------------------------------------------- setup
  config_lib.validate(config, jax.device_count())
  cache_dir = _use_compilation_cache(config, workdir)  # before the first compile, the lock's broadcast
  lock = _lock_workdir(workdir)  # before anything is built: a second run on the workdir stops at once
  mesh = sharding.make_mesh(config.mesh)
  num_steps = config_lib.total_steps(config)
  logging.info("Mesh %s over %d devices (%d processes); %d steps of %d examples.", dict(mesh.shape),
               jax.device_count(), jax.process_count(), num_steps, config.global_batch_size)

  # ---------------------------------------------------------------------------------------- input pipeline
  train_iter = build_train_iterator(config.data, global_batch_size=config.global_batch_size, seed=config.seed)
  # Batches go to the devices (uint8) `data.device_prefetch` steps ahead; the state a checkpoint saves is the
  # one after the last batch the loop took, not after those queued.
  train_iter = DevicePrefetcher(train_iter, lambda local: sharding.global_batch(
      {k: local[k] for k in ("image", "text", "hard_negative") if k in local}, mesh), config.data.device_prefetch)

  # ---------------------------------------------- model, loss, optimizer, the train step and its sharded state
  # One builder for this loop, the benchmark and the AOT tool: the state is only described (eval_shape), its
  # shardings derived, and the step jitted with them; nothing is materialised yet.
  model = sycoca.build_model(config.model)
  heads = losses.enabled_heads(config.loss)
  train_step = make_train_step(config, model, mesh, num_steps)
  # Replicated output: every host holds the whole (small) images, so process 0 can fetch them; the batch they
  # come from spans every host's devices, which no single host may read.
  visualise = jax.jit(functools.partial(_visualise, model, heads), out_shardings=sharding.replicated(mesh))
  schedule_args = jax.device_put(train_step.schedule_args, sharding.replicated(mesh))  # once, not every step

  # ----------------------------------------------------------------------------- resume or initialise
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_ckpts,
                                       async_save=config.async_checkpointing)
  resume_step = checkpointer.latest_step()
  if resume_step is not None and resume_step > num_steps:
    # Else the loop would run no step and exit as if the run had finished.
    raise ValueError(f"config.total_steps: the run now lasts {num_steps} steps, but {workdir} holds a checkpoint "
                     f"at step {resume_step}. Give a length of at least {resume_step} steps, or a new workdir.")
  if resume_step is not None:
    # The newest checkpoint that reads back and matches its checksums; a damaged newer one is moved aside and
    # named in the log, so the run goes on from the last good state instead of training on damaged weights.
    resume_step, state, data_state = checkpointer.restore_latest(
        train_step.abstract_state,
        check=lambda step: _check_resumed_config(checkpointer.saved_config(step), config, workdir, step))
    if data_state is None:
      raise FileNotFoundError(f"Checkpoint {resume_step} in {workdir} has no input-pipeline state for process "
                              f"{jax.process_index()}; cannot resume exactly.")
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d.", resume_step)
  else:
    state = train_step.init(jax.random.PRNGKey(config.seed))
    if config.init_from.workdir:
      _, source, source_step = ckpt_lib.load_params(
          config.init_from.workdir, None if config.init_from.step < 0 else config.init_from.step)
      towers = tuple(config.init_from.towers) or tuple(source)
      # Every process read the same source weights, so placing them on the global mesh moves no data between
      # hosts; the other towers keep their fresh, already sharded values.
      params = ckpt_lib.init_from(state["params"], source, towers)
      state["params"] = jax.device_put(params, train_step.state_sharding["params"])
      logging.info("Initialised %s from %s (step %d).", towers, config.init_from.workdir, source_step)

  # --------------------------------------------------------------------------------------- evaluators
  evals = evaluators.from_config(config.evals, model, config.data, scheduled_only=True)

  # --------------------------------------------------------------------------------------------- loop
  first_step = int(jax.device_get(state["step"]))
  writer = metrics.create_writer(workdir, resume_step=first_step)  # drops rows a killed run logged past it
  if first_step == 0:
    writer.write_hparams(_hparams(config))
  stop = preemption.PreemptionSync(config.preemption_grace_s, config.preemption_check_steps)
  pending: list[dict[str, jax.Array]] = []
  nonfinite_total = 0
  last_metrics: dict[str, Any] = {}
  t_log, step_log = time.time(), first_step
  param_norm = jax.jit(optax.tree.norm, out_shardings=sharding.replicated(mesh))
  profile_first, profile_last = config.profile_steps or (0, 0)
  # The reference a save compares against: the last checkpoint (None: none yet) and the norm it had.
  last_good = {"step": resume_step, "norm": float(param_norm(state["params"]))}

  def save(step, force=False):
    # Only a sound state is checkpointed: with keep_ckpts checkpoints kept, saving blown-up weights would rotate
    # the last good checkpoint out of the workdir.
    norm, bad_steps = (float(x) for x in jax.device_get((param_norm(state["params"]), state["bad_steps"])))
    growth = config.max_param_norm_growth
    if not np.isfinite(norm) or (growth and norm > growth * last_good["norm"]):
      before, kept = ((f"step {last_good['step']}", f"its last good checkpoint, step {last_good['step']}, is kept")
                      if last_good["step"] is not None else ("initialisation", "no checkpoint was written"))
      raise TooManyBadSteps(
          f"Step {step}: the parameter norm is {norm:.3g}, against {last_good['norm']:.3g} at {before} "
          f"(config.max_param_norm_growth={growth}). The run stops without checkpointing it; {kept}. Lower "
          f"optim.lr or raise optim.warmup_steps.")
    if bad_steps >= config.max_bad_steps:
      raise TooManyBadSteps(_too_many_bad_steps(config, step))
    if bad_steps and step < num_steps and not force:
      # A non-finite streak in progress: the state is the last finite one, but wait to see the streak end.
      logging.warning("Step %d: not checkpointed, the last %d steps were non-finite.", step, bad_steps)
      return
    writer.flush()  # rows up to a checkpointed step are never lost with the process (object stores buffer them)
    checkpointer.save(step, state, train_iter.get_state(), config, force=force)
    last_good.update(step=step, norm=norm)

  try:
    for step in range(first_step + 1, num_steps + 1):
      if step == profile_first:
        jax.profiler.start_trace(str(paths.resolve(workdir) / "profile"))
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(train_iter)
        if step == first_step + 1:
          state, aux = _first_step(train_step.step, state, batch, schedule_args, cache_dir)
        else:
          state, aux = train_step.step(state, batch, schedule_args)
      if step == profile_last:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        logging.info("Profile of steps %d-%d written to %s.", profile_first, profile_last,
                     paths.resolve(workdir) / "profile")
      pending.append(aux)  # stays on device: fetching now would stall the dispatch of the next step

      if config_lib.every(step, config.log_steps, num_steps):
        fetched = jax.device_get(pending)
        pending = []
        nonfinite_total += sum(int(m["nonfinite"]) for m in fetched)
        last = fetched[-1]
        if any(int(m["bad_steps_in_a_row"]) >= config.max_bad_steps for m in fetched):
          raise TooManyBadSteps(_too_many_bad_steps(config, step))
        # Timed after the fetch, which waits for the steps to finish: dispatch is asynchronous.
        elapsed = time.time() - t_log
        steps_per_sec = (step - step_log) / max(elapsed, 1e-9)
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in last if k not in ("bad_steps_in_a_row",)}
        scalars.update(learning_rate=float(last["learning_rate"]), nonfinite_total=nonfinite_total,
                       steps_per_sec=steps_per_sec, examples_per_sec=steps_per_sec * config.global_batch_size,
                       eta_minutes=(num_steps - step) / steps_per_sec / 60)
        scalars.update({f"data/{k}": v for k, v in _sum_over_hosts(train_iter.stats).items()})
        writer.write_scalars(step, scalars)
        logging.info("Step %d/%d: loss %.4f, %.2f steps/s, ETA %.1f min.", step, num_steps, scalars["loss"],
                     steps_per_sec, scalars["eta_minutes"])
        last_metrics = scalars
        t_log, step_log = time.time(), step

      if config.image_log_steps and config_lib.every(step, config.image_log_steps, num_steps):
        writer.write_images(step, jax.device_get(visualise(state["params"], batch)))

      for _, evaluator, cadence in evals:
        if config_lib.every(step, cadence, num_steps):
          results = evaluator.run(state["params"])
          writer.write_scalars(step, results)
          last_metrics.update(results)

      stopping = stop.reached(step)  # the same answer on every host
      if config_lib.every(step, config.ckpt_steps, num_steps) or stopping:
        save(step, force=stopping)
      if stopping:
        checkpointer.wait()
        raise Preempted(f"SIGTERM: checkpointed step {step} in {workdir}; rerun the same command to resume.")
  finally:
    stop.close()
    checkpointer.close()
    writer.flush()
    lock.release()
  return last_metrics


# ------------------------------------------------------------------------------------------------------------------
# The train step: built once here for the loop above, tools/benchmark.py and tools/aot.py.
# ------------------------------------------------------------------------------------------------------------------


class TrainStep(NamedTuple):
  """The jitted pieces of one training run on a mesh, and the shapes and shardings that feed them."""
  init: Callable[[jax.Array], dict[str, Any]]   # rng -> state, every array born split over the mesh
  # (state, batch, schedule_args) -> (state, aux); donates state
  step: Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]
  schedule_args: dict[str, np.ndarray]          # the learning-rate schedule's numbers (optim.schedule_args)
  abstract_state: Any                           # ShapeDtypeStructs of the state, carrying their shardings
  abstract_batch: dict[str, jax.ShapeDtypeStruct]  # one global batch, likewise
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding


def make_train_step(config: ml_collections.ConfigDict, model: sycoca.SyCoCa, mesh: jax.sharding.Mesh,
                    num_steps: int) -> TrainStep:
  """The train step for `config` on `mesh`, described abstractly: the caller decides what to materialise.

  The trainer calls `init` (or restores a checkpoint into `abstract_state`) and runs `step`; the AOT tool lowers
  `step` with `abstract_state` and `abstract_batch` for a TPU topology it does not have.
  """
  heads = losses.enabled_heads(config.loss)
  grad_fn = losses.make_grad_fn(model, config.loss, config.grad_accum_steps, mesh)
  # Towers no enabled objective uses get no update (and no weight decay): switching objectives between
  # runs then never silently drifts them. The softmax loss never reads the logit bias.
  unused = [f"^{t}($|/)" for head, towers in TOWER_OF_HEAD.items() if head not in heads for t in towers]
  if "itc" in heads and config.loss.contrastive != "sigmoid":
    unused.append("^logit_bias$")
  # The ITC loss picks the temperature's (and bias's) starting values: SigLIP's for the sigmoid loss.
  init_model = model.clone(**losses.contrastive_init(config.loss))

  # The schedule's numbers (peak rate, warmup, length) are arguments of the step, not constants compiled into it:
  # runs that differ only in length or peak rate (a resume with a new length, an lr sweep, the tests' runs of 2 and
  # 6 steps) share one program and its entry in the persistent compilation cache.
  make_tx = lambda params, schedule: optim.make_optimizer(config.optim, params, schedule, frozen=unused)

  def init_state(rng):
    params = sycoca.init_params(init_model, rng)
    tx = make_tx(params, optim.schedule(config.optim, num_steps))  # the state holds the count, not the rate
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": rng, "bad_steps": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_sharding = sharding.param_shardings(abstract, mesh, config.sharding_rules)
  batch_sharding = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
                     out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  def train_step(state, batch, schedule_args):
    lr_schedule = optim.warmup_cosine(**schedule_args)
    tx = make_tx(state["params"], lr_schedule)
    # uint8 pixels from the host, normalised here once (one multiply-add that XLA fuses into its first use):
    # a quarter of the bytes of float32 at every stage before, the host-to-device copy included.
    batch = dict(batch, image=pixels.normalize(batch["image"]))
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    # The mesh in context: what a Pallas kernel in the model (attention_impl='splash') needs to run per chip.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      grads, aux = grad_fn(state["params"], batch, step_rng, state["step"])
    # Named so that the AOT tool's breakdown of the compiled step can tell the update's ops from the model's.
    with jax.named_scope("optimizer"):
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      # A non-finite step is skipped whole: parameters and optimizer moments stay as they were.
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      bad_steps = jnp.where(finite, 0, state["bad_steps"] + 1)
      new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                   "opt_state": keep(opt_state, state["opt_state"]), "rng": state["rng"], "bad_steps": bad_steps}
    # The rate this update used comes from the optimizer's own count, which skipped steps do not advance.
    aux = dict(aux, grad_norm=grad_norm, learning_rate=lr_schedule(_schedule_count(state["opt_state"])),
               nonfinite=(~finite).astype(jnp.int32), bad_steps_in_a_row=bad_steps)
    return new_state, aux

  b, s, l = config.global_batch_size, config.model.vision.image_size, config.model.text.context_length
  texts = ("text", "hard_negative") if losses.uses_twins(config.loss) else ("text",)
  return TrainStep(
      # Created under jit with out_shardings: every array is born split over the mesh, never whole on one device.
      init=jax.jit(init_state, out_shardings=state_sharding),
      step=train_step,
      schedule_args=optim.schedule_args(config.optim, num_steps),
      abstract_state=jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  abstract, state_sharding),
      abstract_batch={"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=batch_sharding),
                      **{k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=batch_sharding) for k in texts}},
      state_sharding=state_sharding,
      batch_sharding=batch_sharding,
  )


def _check_resumed_config(saved: Optional[dict], config: ml_collections.ConfigDict, workdir: str,
                          step: int) -> None:
  """Refuses a resume that changes the model or the variant; warns about (and explains) any other change."""
  if saved is None:
    return
  refused, schedule, other = config_lib.resume_changes(saved, config)
  if refused:
    raise ValueError(f"{workdir} holds step {step} of a run with another model or objective; changed: "
                     f"{', '.join(refused)}. Resume with the run's own settings, or start a new workdir.")
  if schedule:
    logging.warning("Resuming step %d with a new length or learning rate: %s. The learning-rate schedule is "
                    "recomputed for the new values and continues from step %d, so the run follows neither the "
                    "old schedule nor a fresh one.", step, ", ".join(schedule), step)
  if other:
    logging.warning("Resuming step %d with changed settings: %s.", step, ", ".join(other))


def _lock_workdir(workdir: str) -> paths.WorkdirLock:
  """Process 0 takes the workdir lock; every process learns whether it did, so all stop together if not."""
  lock, error = paths.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
      atexit.register(lock.release)
    except paths.WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not taken and error is None:
      error = paths.WorkdirLocked(f"Process 0 could not take the lock of {workdir}: another run holds it.")
  if error is not None:
    raise error
  return lock


def _too_many_bad_steps(config: ml_collections.ConfigDict, step: int) -> str:
  return (f"Loss or gradient was NaN/Inf for {config.max_bad_steps} steps in a row (up to step {step}); those "
          f"updates were skipped. Lower optim.lr, raise optim.warmup_steps or check the data.")


def _schedule_count(opt_state: Any) -> jax.Array:
  """The update count optax's learning-rate schedule reads (its ScaleByScheduleState), wherever it sits."""
  return optax.tree_utils.tree_get(
      opt_state, "count", filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config keyed by dotted paths, values as TensorBoard's hparams accept them."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in config_lib.flatten(config.to_dict()).items()}


def _use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Turns on JAX's persistent compilation cache, so that a restarted run loads its train step.

  Where: config.compilation_cache_dir if set; else JAX_COMPILATION_CACHE_DIR (or a cache dir JAX was already
  given), so that one cache serves every run of a user or a test session; else workdir/compilation_cache, which
  a requeued job on new hosts finds again (a gs:// workdir included). Off by default for several CPU
  processes (below). Returns the folder used.
  """
  if not config.compilation_cache_dir and jax.default_backend() == "cpu" and jax.process_count() > 1:
    # JAX writes cache entries from process 0 only, and CPU processes key their programs apart: a restart would
    # load process 0's programs at once while the others compile theirs, past gloo's 30 s connection timeout.
    return jax.config.jax_compilation_cache_dir or "(none: off for CPU processes)"
  path = (config.compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
          or jax.config.jax_compilation_cache_dir or str(paths.resolve(workdir) / "compilation_cache"))
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
  _count_cache_hits()
  return path


@functools.cache
def _count_cache_hits() -> list[int]:
  """[programs loaded from the persistent cache so far]: JAX reports each hit as a monitoring event."""
  hits = [0]

  def listen(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      hits[0] += 1

  jax.monitoring.register_event_listener(listen)
  return hits


def _first_step(step_fn, state, batch, schedule_args, cache_dir: str):
  """The first step, whose call compiles the train step (or loads it from the cache): timed and logged."""
  hits, t = _count_cache_hits()[0], time.time()
  state, aux = step_fn(state, batch, schedule_args)  # returns once compiled and dispatched
  loaded = _count_cache_hits()[0] - hits
  logging.info("Train step compiled in %.1f s (%s from the compilation cache %s).", time.time() - t,
               f"{loaded} programs loaded" if loaded else "nothing loaded", cache_dir)
  return state, aux


def _sum_over_hosts(counts: dict[str, int]) -> dict[str, int]:
  """Per-host counters (e.g. skipped examples by reason) summed over every host: one small gather."""
  if jax.process_count() == 1:
    return counts
  size = 4096  # bytes of JSON per host; a counter table far beyond it keeps only its total
  text = json.dumps(counts).encode()
  if len(text) > size:
    text = json.dumps({"skipped": counts.get("skipped", 0)}).encode()
  buffer = np.zeros(size, np.uint8)
  buffer[:len(text)] = np.frombuffer(text, np.uint8)
  total: dict[str, int] = {}
  for row in multihost_utils.process_allgather(buffer):
    for key, value in json.loads(bytes(row).rstrip(b"\0")).items():
      total[key] = total.get(key, 0) + value
  return dict(sorted(total.items()))


def _visualise(model, heads, params, batch, count: int = 4) -> dict[str, jax.Array]:
  """Images for TensorBoard: the input, IC's patches, TG-MIM's visible patches and its reconstruction."""
  images, text = pixels.normalize(batch["image"][:count]), batch["text"][:count]
  if "mim" not in heads and not ("ic" in heads and model.ic_ratio > 0):
    return {}
  out = model.apply({"params": params}, images, text, heads=[h for h in heads if h != "itc"] or ["ic"])
  masks = out["masks"]
  p = model.image_encoder.patch_size
  patches = patchify(images, p)
  show = lambda x: jnp.clip(pixels.denormalize(unpatchify(x, p)), 0, 1)
  result = {"input": show(patches)}
  if masks.ic_keep is not None:
    ic = jnp.zeros(patches.shape[:2]).at[jnp.arange(count)[:, None], masks.ic_keep].set(1.0)
    result["ic_patches"] = show(patches * ic[..., None])
  if "mim_pred" in out:
    mean, std = patches.mean(-1, keepdims=True), patches.std(-1, keepdims=True)
    recon = out["mim_pred"] * std + mean
    hidden = masks.mim_mask[..., None]
    result["mim_visible"] = show(patches * (1 - hidden))
    result["mim_reconstruction"] = show(patches * (1 - hidden) + recon * hidden)
  return result
