"""Stopping on SIGTERM, collectively: every host stops at the same step, saves it, and leaves.

  stop = preemption.PreemptionSync(grace_s=config.preemption_grace_s, check_steps=config.preemption_check_steps)
  for step in ...:
    state, aux = train_step(state, batch)
    if stop.reached(step):      # the same answer on every host, at the same step
      save(step); wait; exit 0

Why collective: a scheduler (a TPU VM's maintenance, SLURM's time limit or preemption) may signal one host, or
all of them at slightly different moments. A host that acted on its own signal would enter the checkpoint's
collectives at another step than its peers, and every host would hang there with nothing saved.

How the hosts agree: through the key-value store of JAX's distributed runtime (the coordination service that
JAX's own preemption sync point uses), never through the devices, so the check adds no device work. Every
`check_steps` steps, after dispatching that step, each host announces a SIGTERM it received (a key naming the
step), then waits at a barrier for every host to reach the same step, then reads the announcements: one made
at this step or earlier means every host stops here. All hosts read after all have announced, so all decide
alike; an announcement made later names a later step, so a host slow to read cannot act on it early. The
barrier only lines up the hosts' Python loops (every host has dispatched the step, so none waits on a device
for another), at the cost of one round trip to the coordinator per check. One process needs no agreement: it
stops at the step its own flag is seen. (JAX's `multihost_utils.reached_preemption_sync_point` is the same
idea, but its SIGTERM handler, installed in C++, keeps SIGTERM for good, and it picks the sync step without
waiting for the hosts, so a host whose loop ran ahead of the others can already be past it.)

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
from typing import Optional

import jax
from absl import logging

_RUNS = [0]  # PreemptionSyncs made in this process; the same sequence on every host names each run's keys


class PreemptionSync:
  """SIGTERM on any host -> `reached(step)` is True on every host at one agreed step (see the module doc)."""

  def __init__(self, grace_s: float = 300.0, check_steps: int = 1, barrier_timeout_s: float = 3600.0):
    self.flag = False
    self._grace_s, self._check_steps, self._barrier_ms = grace_s, check_steps, int(barrier_timeout_s * 1000)
    self._closed = threading.Event()
    self._previous = None
    self._wakeup = None
    self._announced = False
    self._keys = f"sycoca_preemption/{_RUNS[0]}"
    _RUNS[0] += 1
    self._client = None
    if jax.process_count() > 1:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the runtime's client, no public API)
      self._client = distributed.global_state.client
    self._install()

  # --------------------------------------------------------------------------------------- the agreement

  def reached(self, step: int) -> bool:
    """Whether every host stops at `step` (the same answer everywhere). Call once per step, on every host."""
    if self._client is None:
      return self.flag
    if step % self._check_steps:
      return False
    if self.flag and not self._announced:
      self._client.key_value_set(f"{self._keys}/requested/{jax.process_index()}", str(step))
      self._announced = True
    # A barrier with a long timeout: hosts that evaluate or checkpoint together may take long to meet, while a
    # host that died is noticed by the runtime itself, which then ends every process.
    self._client.wait_at_barrier(f"{self._keys}/{step}", self._barrier_ms)
    announced = [int(v) for _, v in self._client.key_value_dir_get(f"{self._keys}/requested/")]
    if any(at <= step for at in announced):
      logging.warning("A host was asked to stop: every host stops at step %d.", step)
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
