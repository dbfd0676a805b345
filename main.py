"""Entry point: pretraining and evaluation of SyCoCa models.

  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny
  python main.py --config=configs/sycoca_base.py:variant=coca --workdir=gs://bucket/run --config.global_batch_size=4096
  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny --mode=eval

A workdir that already holds checkpoints is resumed from its latest one.
"""

import difflib
import os
import sys

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


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=g-import-not-at-top
  from sycoca_jax import metrics  # pylint: disable=g-import-not-at-top  (after TF_CPP_MIN_LOG_LEVEL: it loads TF)
  logging.get_absl_handler().addFilter(metrics.QuietLibraries())

  if FLAGS.coordinator_address:
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed or (FLAGS.distributed is None and _launched_by_cluster()):
    jax.distributed.initialize()
  # Import after the runtime is up: the data and model modules only read jax.process_index() at use.
  from sycoca_jax import checkpoint, evaluate, paths, train  # pylint: disable=g-import-not-at-top

  logging.info("Process %d / %d, %d local devices of %d.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if FLAGS.mode == "train":
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train.Preempted as e:  # a clean exit: the scheduler restarts us and we resume
      logging.warning("%s", e)
    # The message says it all.
    except (paths.WorkdirLocked, checkpoint.CheckpointUnreadable, checkpoint.HostCountChanged) as e:
      sys.exit(f"FATAL {e}")
  else:
    evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override of an unknown config key reported in one line.

  ml_collections raises a bare AttributeError from deep inside flag parsing for --config.optim.learning_rate=1
  (absl only catches its own flag errors), which reads as a crash; this names the key and the nearest known one.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # A config file's own error (e.g. a misspelt :argument) arrives with its traceback inside the message.
    head, _, trace = str(e).partition("Traceback (most recent call last):")
    message = head.strip() + (" " + trace.strip().splitlines()[-1] if trace.strip() else "")
    sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:
    keys = [a[2:].partition("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit("FATAL Flags parsing error: " + _unknown_key_message(keys, str(e).strip("'\"")))


def _unknown_key_message(keys: list[str], missing: str) -> str:
  """'--config.optim.lrr: unknown config key 'lrr'. Did you mean --config.optim.lr?' for the first bad key."""
  from sycoca_jax import config_lib  # pylint: disable=g-import-not-at-top

  for key in keys:
    node, path = config_lib.default_config(), key.split(".")[1:]
    for i, part in enumerate(path):
      if not hasattr(node, "keys") or (i and path[0] == "evals"):
        break  # a leaf, or an evaluator's free-form settings: the run's own config decides, not the defaults
      if part not in node:
        parent = ".".join(["config", *path[:i]])
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f"Did you mean --{parent}.{near[0]}?" if near else f"{parent} has: {', '.join(sorted(node))}."
        return f"--{key}: unknown config key {part!r}. {hint}"
      node = node[part]
  named = [k for k in keys if missing in k.split(".")]
  return f"--{named[0] if named else 'config.KEY'}: unknown config key {missing!r}."


def _launched_by_cluster() -> bool:
  return any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                       "JAX_COORDINATOR_ADDRESS"))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
