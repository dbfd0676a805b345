"""Entry point: pretraining and evaluation of SyCoCa models.

  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny
  python main.py --config=configs/sycoca_base.py:variant=coca --workdir=gs://bucket/run --config.global_batch_size=4096
  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny --mode=eval

A workdir that already holds checkpoints is resumed from its latest one.
"""

import logging as logging_std
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':args'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate at the config's cadence) or only "
                  "evaluate the workdir's latest (or --step) checkpoint.")
flags.DEFINE_integer("step", None, "Checkpoint step for --mode=eval (default: latest).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when launched by a cluster "
                  "scheduler that JAX detects, e.g. on multi-host TPU or SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does not detect "
                    "(e.g. launch/local_multiprocess.sh).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Keeps the log to what a person reads: orbax and grain log every file they touch at INFO."""

  def filter(self, record):
    noisy = ("/orbax/", "/grain/", "/etils/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.coordinator_address:
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed or (FLAGS.distributed is None and _launched_by_cluster()):
    jax.distributed.initialize()
  # Import after the runtime is up: the data and model modules only read jax.process_index() at use.
  from sycoca_jax import evaluate, train  # pylint: disable=g-import-not-at-top

  logging.info("Process %d / %d, %d local devices of %d.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if FLAGS.mode == "train":
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:  # a clean exit: the scheduler restarts us and we resume
      logging.warning("%s", e)
  else:
    evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


def _launched_by_cluster() -> bool:
  return any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                       "JAX_COORDINATOR_ADDRESS"))


if __name__ == "__main__":
  app.run(main)
