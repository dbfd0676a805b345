"""Device prefetch: batches put on the devices ahead of the step, each with the input state it leaves behind.

  batches = DevicePrefetcher(train_iter, put=lambda local: sharding.global_batch(local, mesh), size=2)
  batch = next(batches)        # already on the devices; `size` more are on their way behind it
  batches.get_state()          # the input state after `batch`, not after the ones queued behind it

Without it, each log, save or evaluation (which waits for the device) would leave the queue empty, and the next
step would wait for a whole batch to be assembled and copied. With it, next() first tops the queue up to
`size` batches behind the one it returns, so that host work (taking the batch from the workers, the
host-to-device copy, itself asynchronous) runs while the device still computes the step already dispatched.

A checkpoint must resume at the batch after the last one trained on. The wrapped iterator has read `size`
batches further, so its own state would skip them: each queued batch carries the iterator state taken just
after it was read, and get_state() answers with the state of the last batch handed out. set_state drops the
queue and restores the wrapped iterator, so a restore before the first next() reads nothing twice.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from sycoca_jax.data import pipeline


class DevicePrefetcher:
  """An iterator of device batches over a TrainIterator (or anything with get_state / set_state / close)."""

  def __init__(self, iterator: Any, put: Callable[[dict], Any], size: int = 2):
    if size < 1:
      raise ValueError(f"data.device_prefetch={size}: put at least one batch on the devices ahead of the step.")
    self._iterator, self._put, self._size = iterator, put, size
    self._queue: collections.deque = collections.deque()  # (device batch, the iterator's state after it)
    self._state: dict | None = None  # state after the last batch handed out (None: none since a restore)

  def __iter__(self) -> DevicePrefetcher:
    return self

  def __next__(self) -> Any:
    while len(self._queue) <= self._size:
      local = next(self._iterator)
      self._queue.append((self._put(local), self._iterator.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> dict:
    return self._state if self._state is not None else self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._queue.clear()
    self._state = None
    self._iterator.set_state(state)

  @property
  def stats(self) -> dict[str, int]:
    """The skip counters as of the last batch handed out (pipeline.stats_of)."""
    return pipeline.stats_of(self.get_state())

  def close(self) -> None:
    self._queue.clear()
    self._iterator.close()
