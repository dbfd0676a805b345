r"""Train-step benchmark: compile time, step time, throughput, FLOPs, MFU and peak memory for a config.

  python -m sycoca_jax.tools.benchmark --config=configs/sycoca_tiny.py
  python -m sycoca_jax.tools.benchmark --config=configs/sycoca_base.py --config.global_batch_size=64 \
      --peak_tflops=989   # a given peak (e.g. H100 bf16 dense); default: measured with a large matmul

Runs the train step that training runs (built by sycoca_jax.train.make_train_step) on synthetic batches (the
input pipeline is benchmarked separately by sycoca_jax.tools.data_benchmark). FLOPs come from XLA's cost
analysis of the compiled step; MFU = FLOPs per step / step time / peak. Works unchanged on CPU, GPU and TPU.
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sycoca_jax import config_lib, losses, sharding, train
from sycoca_jax.models import sycoca

FLAGS = flags.FLAGS


def define_flags():
  """The command line, defined when the tool runs (not on import: several tools in one process, e.g. a test
  session, would define --config twice)."""
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':args'.", lock_config=True)
  flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
  flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of the whole mesh for MFU; 0 = measure a large matmul.")
  flags.mark_flags_as_required(["config"])


def measure_peak_flops(dtype, n: int = 0, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n matmuls on every device at once (sharded over the devices)."""
  n = n or (8192 if jax.default_backend() != "cpu" else 1024)
  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.ones((jax.device_count() * n, n), dtype), spec)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * jax.device_count() * n ** 3 / best


def peak_memory_bytes() -> tuple[float, str]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "host RSS"


def benchmark(config, steps: int, peak_tflops: float = 0.0) -> dict[str, float]:
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  model = sycoca.build_model(config.model)
  train_step = train.make_train_step(config, model, mesh, config_lib.total_steps(config))
  state = train_step.init(jax.random.PRNGKey(config.seed))

  b, s, l = config.global_batch_size, config.model.vision.image_size, config.model.text.context_length
  rng = np.random.RandomState(0)
  text = rng.randint(3, config.model.text.vocab_size, (b, l)).astype(np.int32)
  text[:, 0], text[:, l // 2] = 1, 2
  text[:, l // 2 + 1:] = 0
  local = {"image": rng.randint(0, 256, (b, s, s, 3)).astype(np.uint8), "text": text}
  if losses.uses_twins(config.loss):  # each caption's false twin: its first word changed
    local["hard_negative"] = np.where(np.arange(l) == 1, (text + 1) % config.model.text.vocab_size, text)
  batch = sharding.global_batch(local, mesh)
  schedule_args = jax.device_put(train_step.schedule_args, sharding.replicated(mesh))

  t = time.perf_counter()
  compiled = train_step.step.lower(state, batch, schedule_args).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  for _ in range(2):
    state, aux = compiled(state, batch, schedule_args)
  aux["loss"].block_until_ready()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, aux = compiled(state, batch, schedule_args)
    aux["loss"].block_until_ready()
    times.append(time.perf_counter() - t)

  step_s = float(np.median(times))
  if peak_tflops:
    peak, peak_src = peak_tflops * 1e12, "given"
  else:
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" and jax.default_backend() != "cpu" else jnp.float32
    peak, peak_src = measure_peak_flops(dtype), "measured matmul"
  mem, mem_src = peak_memory_bytes()
  return {
      "devices": jax.device_count(), "backend": jax.default_backend(), "batch": b, "compile_s": compile_s,
      "step_ms_median": step_s * 1e3, "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
      "examples_per_s": b / step_s, "gflops_per_step": flops / 1e9, "achieved_tflops": flops / step_s / 1e12,
      "peak_tflops": peak / 1e12, "peak_source": peak_src, "mfu_percent": 100 * flops / step_s / peak,
      "peak_memory_gib": mem / 2 ** 30, "memory_source": mem_src, "loss": float(aux["loss"]),
  }


def format_table(name: str, r: dict) -> str:
  rows = [("config", name), ("backend / devices", f"{r['backend']} x {r['devices']}"),
          ("global batch", r["batch"]), ("compile time (s)", f"{r['compile_s']:.1f}"),
          ("step time median (ms)", f"{r['step_ms_median']:.1f}"), ("step time p90 (ms)", f"{r['step_ms_p90']:.1f}"),
          ("examples / s", f"{r['examples_per_s']:.1f}"), ("model GFLOPs / step (XLA)", f"{r['gflops_per_step']:.2f}"),
          ("achieved TFLOP/s", f"{r['achieved_tflops']:.4f}"),
          (f"peak TFLOP/s ({r['peak_source']})", f"{r['peak_tflops']:.4f}"), ("MFU (%)", f"{r['mfu_percent']:.1f}"),
          (f"peak memory GiB ({r['memory_source']})", f"{r['peak_memory_gib']:.2f}")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
  del argv
  result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.peak_tflops)
  print(format_table(FLAGS["config"].config_filename, result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
