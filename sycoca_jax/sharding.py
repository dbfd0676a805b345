"""The device mesh and how arrays are laid out on it.

Two mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose parameters and optimizer
state are also split). The batch is split over both; each parameter is split over `fsdp` along its largest
dimension that divides evenly, unless a rule says otherwise. With fsdp = 1 this is plain data parallelism.
"""

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sycoca_jax import optim

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """cfg.data and cfg.fsdp are axis sizes; -1 takes every device the other axis leaves.

  `devices` defaults to all of this job's devices; the AOT tool passes a TPU topology's (compile-only) devices.
  """
  n = len(devices) if devices is not None else jax.device_count()
  data, fsdp = cfg.data, cfg.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of mesh.data, mesh.fsdp may be -1.")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"config.mesh: mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} does not use all {n} devices.")
  # Auto axes: XLA's partitioner propagates shardings through the model (explicit-sharding mode would ask
  # every reshape in the towers to name its output sharding).
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """Split the largest dimension divisible by the fsdp size (ties: the last one)."""
  if fsdp == 1 or not shape:
    return P()
  dims = [i for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
  if not dims:
    return P()
  axis = max(dims, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return P(*spec)


def param_shardings(abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = ()) -> Any:
  """NamedShardings for a pytree of ShapeDtypeStructs. rules: (pattern, 'fsdp' | 'replicate'), first match wins."""
  choice = optim.match_rules(abstract, rules, default="fsdp")
  fsdp = mesh.shape["fsdp"]

  def pick(leaf, how):
    if how == "replicate":
      return NamedSharding(mesh, P())
    if how != "fsdp":
      raise ValueError(f"config.sharding_rules: {how!r} is not 'fsdp' or 'replicate'.")
    return NamedSharding(mesh, _fsdp_spec(leaf.shape, fsdp))

  return jax.tree.map(pick, abstract, choice)


def global_batch(local: Mapping[str, np.ndarray], layout: Mesh | NamedSharding) -> dict[str, jax.Array]:
  """This process's slice of the batch -> global arrays: split over a mesh's batch axes, or as `layout` says."""
  sharding = batch_sharding(layout) if isinstance(layout, Mesh) else layout
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
