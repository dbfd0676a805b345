"""Standalone evaluation of a checkpoint: `python main.py --config=... --workdir=DIR --mode=eval [--step=N]`.

Runs every evaluator in config.evals on the workdir's latest (or given) checkpoint and writes the results to
the same metric writers as training, at the checkpoint's step.
"""

from typing import Any, Optional

import jax
import ml_collections
from absl import logging
from etils import epath

from sycoca_jax import checkpoint, config_lib, evaluators, metrics, sharding
from sycoca_jax.models import sycoca


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: epath.PathLike, step: Optional[int] = None
                        ) -> dict[str, Any]:
  config_lib.validate(config)
  if not config.evals:
    raise ValueError("config.evals is empty: nothing to evaluate.")
  # The weights are read straight into the trainer's layout on the mesh (the evaluators split their batches
  # over the weights' mesh): never whole on one device of each host, which a large model would not fit.
  model = sycoca.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh)
  abstract = jax.eval_shape(lambda: sycoca.init_params(model, jax.random.PRNGKey(0)))
  shardings = sharding.param_shardings({"params": abstract}, mesh, config.sharding_rules)["params"]
  _, params, step = checkpoint.load_params(workdir, step, shardings=shardings)
  writer = metrics.create_writer(workdir)
  results: dict[str, Any] = {}
  for name, evaluator, _ in evaluators.from_config(config.evals, model, config.data):
    out = evaluator.run(params)
    logging.info("%s at step %d: %s", name, step, out)
    results.update(out)
  writer.write_scalars(step, results)
  writer.flush()
  if jax.process_index() == 0:
    for k, v in sorted(results.items()):
      print(f"{k:40s} {v:.4f}")
  return results
