"""Checkpoints: orbax for the train state, one JSON file per process for its input pipeline.

Layout of a workdir:
  checkpoints/<step>/state/...        params, optimizer state, step, rng (orbax, written asynchronously)
  checkpoints/<step>/config.json      the run's config (process 0)
  data_state/<step>/process_<i>.json  each process's input-pipeline state at that step

Why this survives preemption and SIGKILL: orbax writes a step into a temporary folder and renames it only
once complete, so `latest_step` only ever sees whole checkpoints; the pipeline files are written (and fsynced)
before the orbax save of the same step starts, so a finished step always has its data state.

The workdir may be a local folder or a gs:// URL: every path goes through sycoca_jax.paths (etils.epath), so
on a pod all hosts write their pieces into the one bucket. On Cloud Storage orbax marks finished steps with a
commit file instead of renaming folders, which `latest_step` honours the same way.
"""

import json
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sycoca_jax import optim, paths


class CheckpointUnreadable(RuntimeError):
  """A checkpoint's files are missing or damaged."""


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
      paths.write_atomic(path, json.dumps(data_state))
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      config=ocp.args.JsonSave(config.to_dict())), force=force)
    self._drop_stale_data_states()
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Optional[dict]]:
    """abstract_state: ShapeDtypeStructs with shardings, so arrays come back already laid out on the mesh."""
    folder = self.workdir / "checkpoints" / str(step)
    # Without its tree metadata orbax reports a "pytree structure error" that points at the caller's tree.
    if not (folder / "state" / "_METADATA").exists():
      raise CheckpointUnreadable(f"Checkpoint {folder} is damaged: state/_METADATA is missing. Move the folder "
                                 "aside to resume from the previous checkpoint.")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, OSError) as e:
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointUnreadable(f"Checkpoint {folder} cannot be read ({first_line}). Move the folder aside to "
                                 "resume from the previous checkpoint.") from e
    path = self._data_path(step, jax.process_index())
    data_state = json.loads(path.read_text()) if path.exists() else None
    return restored.state, data_state

  def saved_config(self, step: int) -> Optional[dict]:
    """The run config saved with `step` (as JSON: tuples read back as lists), or None if it has none."""
    if not (self.workdir / "checkpoints" / str(step) / "config").exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

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


def _read_only_manager(directory: epath.PathLike) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.resolve(directory) / "checkpoints",
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))


def load_params(directory: epath.PathLike, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) from a workdir's latest (or given) checkpoint, params on this host's first device.

  Used by evaluation, inference and `config.init_from`; the optimizer state is not read.
  """
  manager = _read_only_manager(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {paths.resolve(directory) / 'checkpoints'}.")
  config = ml_collections.ConfigDict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
  metadata = manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                     metadata["params"])}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
  manager.close()
  return config, restored.state["params"], step


def save_params(directory: epath.PathLike, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Writes a params-only checkpoint that load_params and config.init_from read (e.g. imported weights)."""
  manager = ocp.CheckpointManager(paths.resolve(directory) / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
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
