"""What every evaluator shares: batching with padding masks over global arrays, and host-side collection.

The multi-process contract (same as training): every process feeds its own slice of each global batch, the
last batch is padded to full size with mask False, so every process runs the same number of steps of the same
compiled program (one compile per function, whatever the dataset size), and the outputs are gathered back to
every host and put back in dataset order by each row's index. Results do not depend on the process count.

Shape legend: B global batch, b = B / process count (this process's slice), N examples, E embedding width.

A batch is a dict of global jax arrays with a leading B axis, always holding
  'index'  int32 [B]  the example's position in the dataset (-1 for padding)
  'mask'   bool  [B]  False for padding and for examples that could not be read
plus the data ('image' uint8 [B, S, S, 3] (the model normalises it), 'text' int32 [B, L], ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from sycoca_jax import sharding as sharding_lib
from sycoca_jax.data import pipeline


def data_sharding(params=None) -> NamedSharding:
  """Batch axis split over every device of every process.

  With `params` laid out on a mesh (as the trainer's are), the batch is split over all of that mesh's axes,
  in its device order: jit refuses arguments whose device assignments differ, so eval batches must follow
  the weights' mesh. Otherwise a 1-D 'data' mesh over all devices.
  """
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size == jax.device_count():
      return NamedSharding(sharding.mesh, P(tuple(sharding.mesh.axis_names)))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  return NamedSharding(mesh, P("data"))


def round_batch_size(batch_size: int) -> int:
  """The smallest multiple of the device count that is >= batch_size (every device gets whole rows)."""
  n = jax.device_count()
  return max(n, -(-batch_size // n) * n)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (an all-gather when the array spans several processes)."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def array_batches(arrays: Mapping[str, np.ndarray], global_batch_size: int,
                  transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                  sharding: NamedSharding | None = None) -> Iterator[dict[str, jax.Array]]:
  """Global batches over in-memory arrays that every process holds whole (tokenised texts, small datasets).

  Batch k of process p holds rows k * B + p * b ... k * B + (p + 1) * b - 1 (the EvalSplit layout); rows past
  the end are zeros with index -1 and mask False. `transform` maps this process's rows before they become
  global (e.g. raw 8x8 digits -> S x S images, so only small originals stay in memory).
  `sharding`: of the batch axis (data_sharding(params) to follow the weights' mesh).
  """
  pc, pi = jax.process_count(), jax.process_index()
  if global_batch_size % jax.device_count():
    raise ValueError(f"Eval batch size {global_batch_size} is not divisible by the {jax.device_count()} "
                     "devices; round it with round_batch_size.")
  n = len(next(iter(arrays.values())))
  b = global_batch_size // pc
  sharding = sharding or data_sharding()
  for start in range(0, max(n, 1), global_batch_size):
    rows = np.arange(start + pi * b, start + (pi + 1) * b)
    valid = rows < n
    safe = np.where(valid, rows, 0)
    local = {}
    for key, value in arrays.items():
      chunk = np.asarray(value)[safe]
      local[key] = np.where(valid.reshape((-1,) + (1,) * (chunk.ndim - 1)), chunk, np.zeros_like(chunk))
    if transform is not None:
      local = dict(transform(local))
    local["index"] = np.where(valid, rows, -1).astype(np.int32)
    local["mask"] = valid
    yield sharding_lib.global_batch(local, sharding)


class CachedSplitImages:
  """An EvalSplit's image batches, decoded once and kept in host memory for later runs (cache=True).

  Periodic evals during training would otherwise re-render / re-decode the same images every time.
  `iterate(extras)` attaches per-example arrays (extras[key] indexed by dataset position, e.g. tokenised
  texts) to each of this process's rows before the batch becomes global.
  """

  def __init__(self, split: pipeline.EvalSplit, global_batch_size: int, cache: bool = True,
               num_threads: int = 2):
    self.split, self.global_batch_size, self.cache, self.num_threads = split, global_batch_size, cache, num_threads
    self._local: list[dict[str, np.ndarray]] | None = None

  def __len__(self) -> int:
    return len(self.split)

  def _local_batches(self) -> Iterator[dict[str, np.ndarray]]:
    if self._local is not None:
      yield from self._local
      return
    kept = []
    for local in self.split.batches(self.global_batch_size, num_threads=self.num_threads):
      if self.cache:
        kept.append(local)
      yield local
    if self.cache:
      self._local = kept

  def iterate(self, extras: Mapping[str, np.ndarray] | None = None,
              sharding: NamedSharding | None = None) -> Iterator[dict[str, jax.Array]]:
    sharding = sharding or data_sharding()
    for local in self._local_batches():
      local = dict(local)
      if extras:
        rows = np.clip(local["index"], 0, len(self.split) - 1)
        pad = ~local["mask"]
        for key, value in extras.items():
          chunk = np.asarray(value)[rows]
          chunk[pad] = 0
          local[key] = chunk
      yield sharding_lib.global_batch(local, sharding)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self.iterate()


def collect(fn: Callable[[dict[str, jax.Array]], Mapping[str, jax.Array]], batches: Iterable[dict[str, jax.Array]],
            num: int) -> dict[str, np.ndarray]:
  """Runs fn on every batch and reassembles its outputs (leading B axis) in dataset order on every host.

  Returns the outputs as numpy [num, ...] plus 'valid' bool [num] (False for examples that could not be read;
  their rows are zeros). The outputs stay on device until the last batch is dispatched, then come to the hosts
  in one gather: a gather per batch would make every host wait for every other one at every batch.
  """
  outs: list[dict[str, jax.Array]] = []
  for batch in batches:
    outs.append(dict(fn(batch), index=batch["index"], mask=batch["mask"]))
  valid = np.zeros(num, bool)
  if not outs:
    return {"valid": valid}
  joined = {key: jnp.concatenate([o[key] for o in outs]) for key in outs[0]}  # on device, still split
  host = {key: to_host(value) for key, value in joined.items()}
  index, mask = host.pop("index"), host.pop("mask")
  rows = index[mask]
  out: dict[str, np.ndarray] = {}
  for key, value in host.items():
    out[key] = np.zeros((num,) + value.shape[1:], value.dtype)
    out[key][rows] = value[mask]
  valid[rows] = True
  out["valid"] = valid
  return out


# ------------------------------------------------------------------------------------------------ images


def images_from_arrays(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 / float-in-[0, 1] images [N, H, W] or [N, H, W, C] -> uint8 [N, S, S, 3] (normalised on the device).

  Grey becomes RGB; images are resized (bicubic) to S x S after a central square crop.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out[i] = np.asarray(pipeline.resize_center_crop(pipeline.to_rgb(pil), image_size))
  return out


def load_image_file(path: str, image_size: int) -> np.ndarray:
  """An image file -> uint8 [S, S, 3] (shorter side resized, central crop; normalised on the device)."""
  with open(path, "rb") as f:
    image = pipeline.decode_image(f.read(), min_side=image_size)
  return np.asarray(pipeline.resize_center_crop(image, image_size))
