"""Stopping on SIGTERM, collectively: every host stops at the same step, saves it, and leaves.

  stop = preemption.PreemptionSync(mesh, grace_s=config.preemption_grace_s)
  for step in ...:
    state, aux = train_step(state, batch)
    if stop.reached(step):      # the same answer on every host, at the same step
      save(step); wait; exit 0

Why collective: a scheduler (a TPU VM's maintenance, SLURM's time limit or preemption) may signal one host, or
all of them at slightly different moments. A host that acted on its own signal would enter the checkpoint's
collectives at another step than its peers, and every host would hang there with nothing saved.

How the hosts agree: after each step every host contributes its flag to a tiny all-reduce (dispatched like the
step, never waited for at once) and reads the result of the step `LAG` steps back. All hosts read the same
reduction at the same step, so all stop at that step. Reading `LAG` steps late keeps the loop from waiting on
the device each step: the host dispatches ahead as before, by at most `LAG` steps. One process needs no
reduction: it stops at the step its own flag is seen.

Why the process stays killable: the handler only sets the flag; a second SIGTERM, or `grace_s` seconds without
an exit (a peer that died, a collective that hangs), ends the process with SIGTERM's usual status. That is
watched from a thread fed by signal.set_wakeup_fd, which the interpreter writes to even while the main thread
is blocked inside a collective (where a Python handler would never run).
"""

import os
import select
import signal
import sys
import threading
import time
from collections import deque
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

LAG = 2  # steps between a host's vote and its reading of the result


class PreemptionSync:
  """SIGTERM on any host -> `reached(step)` is True on every host at one agreed step (see the module doc)."""

  def __init__(self, mesh: jax.sharding.Mesh, grace_s: float = 300.0):
    self.flag = False
    self._grace_s = grace_s
    self._votes: deque[tuple[int, jax.Array]] = deque()
    self._closed = threading.Event()
    self._previous = None
    self._wakeup = None
    self._multihost = jax.process_count() > 1
    if self._multihost:
      # One vote per device, each host filling its own: the max over all is "some host was signalled".
      self._vote_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._install()

  # --------------------------------------------------------------------------------------- the agreement

  def reached(self, step: int) -> bool:
    """Whether every host stops at `step` (the same answer everywhere). Call once per step, on every host."""
    if not self._multihost:
      return self.flag
    local = np.full((len(self._vote_sharding.addressable_devices),), int(self.flag), np.int32)
    votes = jax.make_array_from_process_local_data(self._vote_sharding, local)
    self._votes.append((step, self._reduce(votes)))
    if len(self._votes) <= LAG:
      return False
    voted_at, result = self._votes.popleft()
    if int(result):  # a replicated scalar: every host reads its own copy
      logging.warning("A host was asked to stop at step %d: every host stops at step %d.", voted_at, step)
      return True
    return False

  # --------------------------------------------------------------------------------------- the signal

  def _install(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook's worker): no preemption handling
      return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
      old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
      old_fd = None
    if old_fd not in (None, -1):  # someone else (e.g. an event loop) reads the wakeup fd: leave it to them
      signal.set_wakeup_fd(old_fd)
      os.close(read)
      os.close(write)
      return
    self._wakeup = (read, write)
    threading.Thread(target=self._watch, args=(read,), daemon=True, name="sigterm-watch").start()

  def _handler(self, signum, frame):
    del signum, frame
    if not self.flag:
      logging.warning("SIGTERM: checkpointing the step all hosts agree on, then stopping. A second SIGTERM ends "
                      "the process at once.")
    self.flag = True

  def _watch(self, read_fd: int):
    """Runs beside the main thread: a second SIGTERM, or the grace period running out, ends the process."""
    first: Optional[float] = None
    while not self._closed.is_set():
      timeout = None if first is None else max(0.0, first + self._grace_s - time.time())
      try:
        ready, _, _ = select.select([read_fd], [], [], timeout if timeout is not None else 1.0)
      except (OSError, ValueError):
        return
      if self._closed.is_set():
        return
      if ready:
        try:
          signals = os.read(read_fd, 64)
        except OSError:
          return
        for s in signals:
          if s != signal.SIGTERM:
            continue
          if first is None:
            first = time.time()
          else:
            self._die("a second SIGTERM")
      elif first is not None and time.time() >= first + self._grace_s:
        self._die(f"no clean exit {self._grace_s:.0f} s after SIGTERM (config.preemption_grace_s)")

  def _die(self, why: str):
    sys.stderr.write(f"FATAL {why}: stopping without a checkpoint of the current step.\n")
    sys.stderr.flush()
    os._exit(128 + signal.SIGTERM)  # the status a shell reports for a process that SIGTERM ended

  def close(self):
    """Puts back the previous SIGTERM handler: after the run, SIGTERM ends the process as usual."""
    self._closed.set()
    if self._wakeup is not None:
      signal.set_wakeup_fd(-1)
      for fd in self._wakeup:
        os.close(fd)
      self._wakeup = None
    if self._previous is not None:
      try:
        signal.signal(signal.SIGTERM, self._previous)
      except ValueError:
        pass
      self._previous = None
