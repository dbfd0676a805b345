"""Checkpoints: orbax for the train state, one JSON file per process for its input pipeline.

Layout of a workdir:
  checkpoints/<step>/state/...        params, optimizer state, step, rng (orbax, written asynchronously)
  checkpoints/<step>/config.json      the run's config (process 0)
  checkpoints/<step>/checksums        a checksum of each saved array, verified on restore (process 0)
  data_state/<step>/process_<i>.json  each process's input-pipeline state at that step, with the process count
                                      and a checksum of the state

Why this survives preemption and SIGKILL: orbax writes a step into a temporary folder and renames it only
once complete, so `latest_step` only ever sees whole checkpoints; the pipeline files are written (and fsynced)
before the orbax save of the same step starts, so a finished step always has its data state.

The workdir may be a local folder or a gs:// URL: every path goes through sycoca_jax.paths (etils.epath), so
on a pod all hosts write their pieces into the one bucket. On Cloud Storage orbax marks finished steps with a
commit file instead of renaming folders, which `latest_step` honours the same way.

Why checksums: a whole checkpoint can still be damaged later (a flipped bit on disk, a bad copy between
buckets), and orbax restores such bytes without complaint; the run then trains on garbage. Each array's
checksum is computed on device when it is saved and again when it is read back, so a damaged checkpoint is
refused by name, and resuming falls back to the newest one that verifies. The input-pipeline state is checked
the same way (it must parse and match its checksum, on every process), since resuming with a damaged one is as
wrong as resuming with damaged weights.

Why the process count is recorded: each process reads its own slice of the example stream, cut by the number of
processes. Resuming on another number of hosts would need every stream position re-split, which skipped
examples make ambiguous; such a resume is refused with a one-line message rather than overlapping examples.
"""

import contextlib
import hashlib
import json
import logging as logging_std
from collections.abc import Iterator
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from sycoca_jax import optim, paths
from sycoca_jax.models.sycoca import SyCoCa, default_model_config


class CheckpointUnreadable(RuntimeError):
  """A checkpoint's files are missing or damaged."""


# Top-level parameters added to the model after checkpoints were written, and the value such a checkpoint loads
# them with: its model did not have them, so the initial value changes nothing it computed.
ADDED_PARAMS = {"logit_bias": SyCoCa.init_logit_bias}   # the sigmoid contrastive loss's bias


def with_added_params(params: dict[str, Any]) -> dict[str, Any]:
  """A SyCoCa params tree with each of ADDED_PARAMS it lacks at its default, beside its logit_scale."""
  missing = {k: v for k, v in ADDED_PARAMS.items() if k not in params}
  if not missing or "logit_scale" not in params:   # complete, or not a SyCoCa tree
    return params
  place = lambda v: jax.device_put(np.float32(v), params["logit_scale"].sharding)
  return dict(params, **{k: place(v) for k, v in missing.items()})


class HostCountChanged(ValueError):
  """The checkpoint's input-pipeline state was written by another number of processes."""


# ------------------------------------------------------------------------------------------------ checksums


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums over an array's bits: plain and position-weighted (any one changed word changes both).

  Integer sums that wrap around are exact and associative, so the result is the same whatever the array's
  sharding, the reduction order or the backend: saved on 8 devices, it verifies on 1.
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size >= 4:  # 8-byte types come back as [..., 2] uint32 words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  words = words.reshape(-1)
  odd = 2 * jnp.arange(words.shape[0], dtype=jnp.uint32) + 1  # odd, so invertible modulo 2**32
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * odd, dtype=jnp.uint32)])


def _leaf_names(tree: Any) -> list[str]:
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def checksums(tree: Any) -> dict[str, str]:
  """{'params/image_encoder/.../kernel': 'hex'} for every array of `tree` (computed on device, one transfer)."""
  # One small program per distinct shape, dtype and sharding, reused by every array that shares them (a tower's
  # layers, the optimizer's moments beside their parameters): a single program over the whole tree compiles about
  # three times longer for the tiny test model, and again for every other tree (parameters alone, a frozen tower).
  leaves = jax.tree.leaves(tree)
  stacked = jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)
  # Where the arrays span hosts, every process takes part and gets the whole (tiny) result.
  sums = multihost_utils.process_allgather(stacked, tiled=True)
  return {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(_leaf_names(tree), sums)}


def verify(tree: Any, expected: dict[str, str], step: int) -> None:
  """Raises CheckpointUnreadable (one line, naming the step) if an array of `tree` is not what was saved."""
  actual = checksums(tree)
  bad = [name for name, value in actual.items() if name in expected and expected[name] != value]
  if bad:
    more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
    raise CheckpointUnreadable(f"Checkpoint step {step} failed verification: {bad[0]}{more} does not match the "
                               "checksum saved with it; its files were damaged after saving.")


# ------------------------------------------------------------------------------------------------ logging


class _DropReadOnlyNotice(logging_std.Filter):
  """Drops orbax's "Given directory is read only" notice, which a read-only load prints and a user cannot act on."""

  def filter(self, record):
    return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only() -> Iterator[None]:
  """Only for the duration of a read-only load, and only that one orbax message (absl logs it as 'absl')."""
  quiet, logger = _DropReadOnlyNotice(), logging_std.getLogger("absl")
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


class Checkpointer:
  """Saves and restores (train state, input-pipeline state) pairs in `workdir`."""

  def __init__(self, workdir: epath.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    self.workdir = paths.resolve(workdir)
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=True),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _data_path(self, step: int, process: int) -> epath.Path:
    return self.workdir / "data_state" / str(step) / f"process_{process}.json"

  def save(self, step: int, state: Any, data_state: Optional[dict], config: ml_collections.ConfigDict,
           *, force: bool = False) -> bool:
    if data_state is not None:
      path = self._data_path(step, jax.process_index())
      path.parent.mkdir(parents=True, exist_ok=True)
      text = json.dumps(data_state, sort_keys=True)
      paths.write_atomic(path, json.dumps({"process_count": jax.process_count(), "process_index":
                                           jax.process_index(), "sha256": _sha256(text), "state": data_state}))
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), checksums=ocp.args.JsonSave(
            checksums(state)), config=ocp.args.JsonSave(config.to_dict())), force=force)
    self._drop_stale_data_states()
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Optional[dict]]:
    """abstract_state: ShapeDtypeStructs with shardings, so arrays come back already laid out on the mesh."""
    folder = self.workdir / "checkpoints" / str(step)
    data_state = self._read_data_state(step)  # first: a refused host count costs no array read
    # Without its tree metadata orbax reports a "pytree structure error" that points at the caller's tree.
    if not (folder / "state" / "_METADATA").exists():
      raise CheckpointUnreadable(f"Checkpoint {folder} is damaged: state/_METADATA is missing.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if (folder / "checksums").exists():  # checkpoints written before checksums were recorded have none
      items["checksums"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, OSError) as e:
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointUnreadable(f"Checkpoint {folder} cannot be read ({first_line}).") from e
    if "checksums" in items:
      verify(restored.state, restored.checksums, step)
    return restored.state, data_state

  def _read_data_state(self, step: int) -> Optional[dict]:
    """This process's input-pipeline state at `step` (None if the checkpoint has none at all).

    Raises HostCountChanged if it was written by another number of processes, and CheckpointUnreadable on every
    process if any process's state is missing or damaged, so that all fall back to the same older step.
    """
    folder = self.workdir / "data_state" / str(step)
    files = sorted(folder.glob("process_*.json")) if folder.is_dir() else []
    if not files:
      return None  # a checkpoint saved without a pipeline state (e.g. params only)
    path, problem, state, recorded = self._data_path(step, jax.process_index()), None, None, len(files)
    try:
      saved = json.loads(path.read_text())
      if "state" in saved:  # with its process count and checksum; older files hold the bare state
        recorded = saved["process_count"]
        state = saved["state"]
        if _sha256(json.dumps(state, sort_keys=True)) != saved["sha256"]:
          problem = "does not match its checksum"
      else:
        state = saved
    except FileNotFoundError:
      problem = "is missing"
    except (ValueError, KeyError, TypeError) as e:
      problem = f"cannot be parsed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if problem is not None:  # the count from another process's file, where one reads back
      recorded = next((c for c in map(_recorded_count, files) if c is not None), recorded)
    if recorded != jax.process_count():
      raise HostCountChanged(
          f"Checkpoint step {step} in {self.workdir} was written by {recorded} processes, and this run has "
          f"{jax.process_count()}: each process's input stream depends on the process count, so resuming would "
          f"repeat or skip examples. Resume with {recorded} processes, or start a new workdir "
          f"(config.init_from can take the weights).")
    bad = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is not None:
      raise CheckpointUnreadable(f"Checkpoint step {step}: the input-pipeline state {path} {problem}.")
    if np.any(bad):
      raise CheckpointUnreadable(f"Checkpoint step {step}: another process's input-pipeline state is damaged "
                                 "(its log names it).")
    return state

  def restore_latest(self, abstract_state: Any, check: Optional[Callable[[int], None]] = None
                     ) -> tuple[Optional[int], Any, Optional[dict]]:
    """(step, state, data_state) of the newest checkpoint that reads back and verifies; (None, None, None) if
    the workdir has none.

    A newer checkpoint that cannot be read or fails verification is reported, moved to
    workdir/damaged_checkpoints/<step> (so the run can save that step again), and the previous one restored.
    If none can be restored, the newest one's error is raised and nothing is moved. `check(step)` runs before
    each restore (e.g. comparing configs); what it raises is passed on.
    """
    failed: list[tuple[int, CheckpointUnreadable]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        if check is not None:
          check(step)
        state, data_state = self.restore(step, abstract_state)
      except CheckpointUnreadable as e:
        failed.append((step, e))
        continue
      for bad, error in failed:
        self._move_aside(bad)
        logging.warning("Resumed from step %d instead of step %d: %s Moved step %d to %s.", step, bad, error, bad,
                        self.workdir / "damaged_checkpoints" / str(bad))
      return step, state, data_state
    if failed:
      raise CheckpointUnreadable(f"{failed[0][1]} No other checkpoint in the workdir can be restored: move "
                                 f"{self.workdir / 'checkpoints'} aside, or use another workdir, to start "
                                 "afresh.") from failed[0][1]
    return None, None, None

  def _move_aside(self, step: int):
    if jax.process_index() == 0:
      target = self.workdir / "damaged_checkpoints" / str(step)
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      (self.workdir / "checkpoints" / str(step)).rename(target)
      (self.workdir / "data_state" / str(step)).rmtree(missing_ok=True)
    if jax.process_count() > 1:  # no process may list the checkpoints before the folder has moved
      ocp.multihost.sync_global_processes(f"sycoca_move_aside_{step}")
    self.manager.reload()

  def saved_config(self, step: int) -> Optional[dict]:
    """The run config saved with `step` (as JSON: tuples read back as lists), or None if it has none."""
    folder = self.workdir / "checkpoints" / str(step)
    if not (folder / "config").exists():
      return None
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except (ValueError, KeyError, OSError) as e:
      raise CheckpointUnreadable(f"Checkpoint {folder} cannot be read (its config: {e}).") from e

  def _drop_stale_data_states(self):
    root = self.workdir / "data_state"
    if jax.process_index() != 0 or not root.is_dir():
      return
    kept = set(self.manager.all_steps())
    latest_saved = max(kept) if kept else -1
    for step_dir in root.iterdir():
      # Keep states of kept steps and of steps newer than the last finished save (still in flight).
      name = step_dir.name
      if name.isdigit() and int(name) not in kept and int(name) < latest_saved:
        step_dir.rmtree(missing_ok=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _recorded_count(path: epath.Path) -> Optional[int]:
  try:
    return int(json.loads(path.read_text())["process_count"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _read_only_manager(directory: epath.PathLike) -> ocp.CheckpointManager:
  # The options a read-only manager would otherwise change, and warn about, are given as it wants them.
  with _quiet_read_only():
    return ocp.CheckpointManager(
        paths.resolve(directory) / "checkpoints",
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0))


def load_params(directory: epath.PathLike, step: Optional[int] = None, shardings: Any = None
                ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) from a workdir's latest (or given) checkpoint.

  Used by evaluation, inference and `config.init_from`; the optimizer state is not read. The params land on
  this host's first device, or with `shardings` (a tree like the params) split over a mesh as they are read,
  so that no host ever holds a model too big for one device whole.
  """
  manager = _read_only_manager(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {paths.resolve(directory) / 'checkpoints'}.")
  config = ml_collections.ConfigDict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
  if "model" in config:
    # A checkpoint written before a model key existed lacks it: such keys take their defaults.
    model = default_model_config()
    model.update(config.model)
    config.model = model
  metadata = manager.item_metadata(step)["state"]
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, metadata["params"])
  abstract = {"params": jax.tree.map(lambda m, sh: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh),
                                     metadata["params"], shardings)}
  items = {"state": ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)}
  if (paths.resolve(directory) / "checkpoints" / str(step) / "checksums").exists():
    items["checksums"] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if "checksums" in items:
    verify(restored.state, restored.checksums, step)  # names are those of the whole state: params/...
  manager.close()
  return config, with_added_params(restored.state["params"]), step


def save_params(directory: epath.PathLike, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Writes a params-only checkpoint that load_params and config.init_from read (e.g. imported weights)."""
  manager = ocp.CheckpointManager(paths.resolve(directory) / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(create=True))
  state = {"params": params}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             checksums=ocp.args.JsonSave(checksums(state)),
                                             config=ocp.args.JsonSave(config.to_dict())), force=True)
  manager.wait_until_finished()
  manager.close()


def init_from(params: Any, source_params: Any, towers: tuple[str, ...]) -> Any:
  """params with the subtrees named in `towers` (top-level keys, e.g. 'image_encoder') taken from source."""
  missing = [t for t in towers if t not in source_params]
  if missing:
    raise ValueError(f"config.init_from.towers: {missing} not in the source checkpoint "
                     f"(it has {sorted(source_params)}).")
  out = dict(params)
  for tower in towers:
    src, dst = source_params[tower], params[tower]
    if jax.tree.structure(src) != jax.tree.structure(dst):
      raise ValueError(f"config.init_from: tower {tower!r} has another structure in the source checkpoint.")
    bad = [p for p, (a, b) in zip(jax.tree.leaves(optim.param_paths(dst)), zip(jax.tree.leaves(src),
                                                                                jax.tree.leaves(dst)))
           if a.shape != b.shape]
    if bad:
      raise ValueError(f"config.init_from: shapes differ for {tower}/{bad[0]} (and {len(bad) - 1} more).")
    out[tower] = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), src, dst)
  return out
