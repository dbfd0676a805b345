r"""Compile the train step for a TPU slice ahead of time, on this machine: per-chip memory, FLOPs, and whether it fits.

  pip install -e ".[tpu]"   # libtpu, the TPU compiler; no TPU is needed
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --topology=v5e-64
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py:slice=v4-64 --topology=v4-64
  python -m sycoca_jax.tools.aot --config=configs/sycoca_tiny.py:runlocal --topology=v5e:2x2
  # the contrastive logits path alone, every ITC loss and layout, at batch 32k on v5e-256:
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --config.global_batch_size=32768 \
      --topology=v5e-256 --logits_path

The step is the one training runs (sycoca_jax.train.make_train_step), lowered for the slice's devices as
`jax.experimental.topologies` describes them, with the config's mesh and global batch, and compiled by the TPU
compiler; nothing is materialised. The compiler's buffer plan gives each chip's memory; the tool exits 1, naming
what to change, when that leaves less than --headroom percent of the chip's HBM free (or does not fit at all).

Slice names: Cloud's (`v4-64`, `v5p-32` count TensorCores, two per chip; `v5e-64`, `v6e-64` and `v5litepod-64`
count chips) or libtpu's chips per axis (`v5e:8x8`, `v4:2x4x4`).

Memory per chip, from `compiled.memory_analysis()`: total = arguments + outputs - donated (aliased) buffers +
temporaries; "parameters + optimizer state" is the state's shards, computed from their shardings. It is measured
against the HBM the TPU compiler itself plans with (what its out-of-memory errors quote: v4 30.75 GiB, v5e
15.75 GiB, v5p 95.74 GiB, v6e 31.25 GiB), slightly less than the marketed 32 / 16 / 95 / 32 GB; compile-only
devices report no memory_stats, so the table lives here.

--logits_path compiles, instead of the step, the contrastive loss and its gradient alone, on the global batch's
[B, E] embeddings split over the config's mesh as training splits them (the same program serves gradient
accumulation, which takes this loss on the whole batch's cached embeddings), for each of softmax / sigmoid and
the dense formula / the sharded one (config.loss.contrastive_impl), and prints their per-chip memory: what
the [B, B] logits cost without compiling the towers (minutes per slice for sycoca_base).

FLOPs per step: XLA's HLO cost analysis of the step lowered on this host with every layer unrolled (a scanned
layer would be counted once, and a TPU lowering reports no count before compilation). It counts what the step
executes: remat's recomputation included, and with gradient accumulation the extra forward pass of both encoders
(the accumulation loop itself would also be counted once, so the whole batch is counted in one piece).
"""

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

# The step is only compiled, never run: the host's own backend is enough, and without a TPU attached libtpu would
# otherwise try (and fail, noisily) to initialise one. Compiling holds no TPU, so several compiles at once (two
# slices, parallel tests) need not take libtpu's one-process lock.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sycoca_jax import config_lib, losses, sharding, train  # noqa: E402
from sycoca_jax.models import sycoca  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The command line, defined when the tool runs (not on import: several tools in one process, e.g. a test
  session, would define --config twice)."""
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':args'.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v4-64, v5e-64, v5p-32, v6e-64, ... or v5e:8x8.")
  flags.DEFINE_float("headroom", 15.0,
                     "Percent of the chip's HBM that must stay free for the step to count as fitting.")
  flags.DEFINE_float("mfu", 40.0, "Assumed model FLOPs utilisation (percent of bf16 peak) for the time estimates.")
  flags.DEFINE_bool("logits_path", False, "Compile only the contrastive loss (every ITC option) and print its "
                    "per-chip memory, instead of the train step.")


GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  cores_in_name: int        # what one chip counts for in Cloud's slice name
  torus_dims: int
  hbm_gib: float            # what the TPU compiler plans with (its out-of-memory message), per chip
  peak_bf16_tflops: float   # published dense bf16 peak per chip
  chip_config: str = ""     # libtpu's chip_config_name; v4 runs its two TensorCores as one device (megacore)


CHIPS = {
    "v4": Chip(cores_in_name=2, torus_dims=3, hbm_gib=30.75, peak_bf16_tflops=275, chip_config="megacore"),
    "v5e": Chip(cores_in_name=1, torus_dims=2, hbm_gib=15.75, peak_bf16_tflops=197),
    "v5p": Chip(cores_in_name=2, torus_dims=3, hbm_gib=95.74, peak_bf16_tflops=459),
    "v6e": Chip(cores_in_name=1, torus_dims=2, hbm_gib=31.25, peak_bf16_tflops=918),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str             # as given
  generation: str       # key of CHIPS
  topology_name: str    # libtpu's, e.g. 'v5e:8x8'
  chips: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def _torus_shape(chips: int, dims: int) -> list[int]:
  """Cloud's chip layout for a power-of-two slice: 2-D 2x2, 2x4, 4x4, ..., 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...

  Each doubling grows the last of the smallest axes.
  """
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  if chips < math.prod(shape) or chips & (chips - 1):
    raise ValueError(f"{chips} chips: give the layout in libtpu's form instead, e.g. "
                     f"{'v5e:4x4' if dims == 2 else 'v4:2x2x4'}.")
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(i for i, d in enumerate(shape) if d == smallest)
    shape[i] *= 2
  return shape


def parse_slice(name: str) -> Slice:
  """'v4-64' / 'v5e-64' / 'v5litepod-64' / 'v5e:8x8' -> the slice's generation, libtpu topology and chip count."""
  m = re.fullmatch(r"(v\d+[a-z]*)([-:])([0-9x]+)", name.strip().lower())
  generation = m and ALIASES.get(m.group(1), m.group(1))
  if not m or generation not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected e.g. v4-64, v5e-64, v5p-32, v6e-64 or v5e:8x8 "
                     f"(generations {sorted(CHIPS)}).")
  chip = CHIPS[generation]
  if m.group(2) == ":":
    shape = [int(d) for d in m.group(3).split("x")]
    if len(shape) != chip.torus_dims:
      raise ValueError(f"--topology={name!r}: {generation} slices have {chip.torus_dims} axes.")
  else:
    count = int(m.group(3))
    if count % chip.cores_in_name:
      raise ValueError(f"--topology={name!r}: {generation} names count TensorCores, {chip.cores_in_name} per chip.")
    shape = _torus_shape(count // chip.cores_in_name, chip.torus_dims)
  return Slice(name, generation, f"{generation}:{'x'.join(map(str, shape))}", math.prod(shape))


def topology_devices(slice_: Slice) -> list[Any]:
  """The slice's compile-only devices (one per chip), from libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": slice_.chip.chip_config} if slice_.chip.chip_config else {}
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology_name, **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" not in str(e):
      raise
    raise RuntimeError("The TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'.") from e
  devices = list(topology.devices)
  if len(devices) != slice_.chips:
    raise ValueError(f"{slice_.topology_name}: libtpu gave {len(devices)} devices for {slice_.chips} chips.")
  return devices


@dataclasses.dataclass
class Report:
  slice: Slice
  device_kind: str
  hosts: int
  mesh: dict[str, int]
  global_batch: int
  accum: int
  model: str
  params: int
  state_bytes: float          # per chip
  batch_bytes: float          # per chip
  temp_bytes: float           # per chip
  total_bytes: float          # per chip
  flops_per_step: float       # whole slice
  bytes_accessed: float       # per chip, the compiled program's HBM reads and writes
  scanned: bool
  num_steps: int
  compile_s: float
  error: str = ""             # the compiler's out-of-memory message, when it refused

  @property
  def headroom(self) -> float:
    return 100.0 * (1.0 - self.total_bytes / (self.slice.chip.hbm_gib * GIB))

  def fits(self, headroom: float) -> bool:
    return not self.error and self.headroom >= headroom

  def step_seconds(self, mfu: float) -> float:
    return self.flops_per_step / (self.slice.chips * self.slice.chip.peak_bf16_tflops * 1e12 * mfu / 100)


def _shard_bytes(abstract: Any) -> float:
  """Bytes each device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
  return float(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract)))


def count_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one train step over the global batch, by XLA's cost analysis of its host lowering, layers unrolled."""
  twin = config.copy_and_resolve_references()
  twin.model.scan_layers = False
  accum, twin.grad_accum_steps = twin.grad_accum_steps, 1
  twin.mesh.update(data=1, fsdp=1)
  model = sycoca.build_model(twin.model)
  mesh = sharding.make_mesh(twin.mesh, jax.devices()[:1])
  step = train.make_train_step(twin, model, mesh, config_lib.total_steps(twin))
  flops = _lowered_flops(step.step, step.abstract_state, step.abstract_batch)
  if accum > 1 and "itc" in losses.enabled_heads(config.loss):
    # The gradient cache first embeds the whole batch without gradient: one more forward pass of both encoders.
    def embed(params, batch):
      apply = lambda method, x: model.apply({"params": params}, x, method=method)["embedding"]
      return apply(sycoca.SyCoCa.encode_image, batch["image"]), apply(sycoca.SyCoCa.encode_text, batch["text"])
    flops += _lowered_flops(jax.jit(embed), step.abstract_state["params"], step.abstract_batch)
  return flops


def _lowered_flops(fn, *args) -> float:
  cost = fn.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _refused_bytes(r: Report) -> tuple[float, float]:
  """(total, temporaries) per chip, at least, from the TPU compiler's out-of-memory message.

  It says either "Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 6.64M" (after its own rematerialisation
  tried to fit) or "the total memory required for HLO temporaries (1.56T) exceeds available HBM (15.75G)".
  """
  size = lambda num, unit: float(num) * 1024 ** ("KMGT".index(unit) + 1)
  hbm = r.slice.chip.hbm_gib * GIB
  exceeded = re.search(r"Exceeded hbm capacity by ([\d.]+)([KMGT])", r.error)
  if exceeded:
    total = hbm + size(*exceeded.groups())
    return total, total - r.state_bytes - r.batch_bytes
  temps = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", r.error)
  if temps:
    temp = size(*temps.groups())
    return r.state_bytes + r.batch_bytes + temp, temp
  return hbm, hbm - r.state_bytes - r.batch_bytes


def compile_for_slice(config: ml_collections.ConfigDict, topology: str) -> Report:
  """Lowers and compiles the train step of `config` for the TPU slice `topology`; nothing runs."""
  slice_ = parse_slice(topology)
  devices = topology_devices(slice_)
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  model = sycoca.build_model(config.model)
  num_steps = config_lib.total_steps(config)
  step = train.make_train_step(config, model, mesh, num_steps)

  m = config.model
  remat = f"'{m.remat_policy}'" if m.remat else "off"
  report = Report(
      slice=slice_, device_kind=devices[0].device_kind, hosts=len({d.process_index for d in devices}),
      mesh=dict(mesh.shape), global_batch=config.global_batch_size, accum=config.grad_accum_steps,
      model=f"{m.dtype} compute, remat {remat}, layers {'scanned' if m.scan_layers else 'unrolled'}",
      params=sum(math.prod(a.shape) for a in jax.tree.leaves(step.abstract_state["params"])),
      state_bytes=_shard_bytes(step.abstract_state), batch_bytes=_shard_bytes(step.abstract_batch),
      temp_bytes=0.0, total_bytes=0.0, flops_per_step=count_flops(config), bytes_accessed=0.0,
      scanned=m.scan_layers, num_steps=num_steps, compile_s=0.0)

  t = time.perf_counter()
  try:
    compiled = step.step.lower(step.abstract_state, step.abstract_batch).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.compile_s = time.perf_counter() - t
    report.error = str(e).strip().splitlines()[0]
    report.total_bytes, report.temp_bytes = _refused_bytes(report)
    return report
  report.compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  mem = compiled.memory_analysis()
  report.temp_bytes = float(mem.temp_size_in_bytes)
  report.total_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                             + mem.temp_size_in_bytes)
  return report


def format_table(r: Report, headroom: float, mfu: float) -> str:
  chip, s = r.slice.chip, r.slice
  hbm = chip.hbm_gib
  per_chip = r.global_batch // s.chips
  micro = f", {r.accum} micro-batches of {per_chip // r.accum}" if r.accum > 1 else ""
  gib = lambda b: f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.1f} MiB"
  flops = lambda f: f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.3f} GFLOP"
  rows = [
      ("slice", f"{s.name} ({s.topology_name})"),
      ("chips", f"{s.chips} x {r.device_kind} ({s.generation}), {r.hosts} host{'s' if r.hosts > 1 else ''}"),
      ("mesh", " x ".join(f"{k} {v}" for k, v in r.mesh.items())),
      ("global batch", f"{r.global_batch} ({per_chip} examples per chip{micro})"),
      ("model", f"{r.params / 1e6:.1f} M parameters, {r.model}"),
      ("per chip: params + optimizer state", gib(r.state_bytes)),
      ("per chip: batch", gib(r.batch_bytes)),
      ("per chip: temporaries", ("at least " if r.error else "") + gib(r.temp_bytes)),
      ("per chip: total", ("at least " if r.error else "") + f"{gib(r.total_bytes)} of {hbm:.2f} GiB HBM "
                          f"(the TPU compiler's budget)"),
      ("HBM headroom", f"{r.headroom:.1f} % (needed: {headroom:g} %)"),
      ("FLOPs per step (XLA, layers unrolled)", f"{flops(r.flops_per_step)} "
                                                f"({flops(r.flops_per_step / r.global_batch)} per example)"),
      ("HBM traffic per chip (XLA, compiled)", "n/a" if r.error else f"{gib(r.bytes_accessed)} per step"
                                               + (" (a scanned layer counted once)" if r.scanned else "")),
      ("compile time", f"{r.compile_s:.0f} s"),
      (f"step time at {mfu:g} % MFU (estimate)",
       f"{r.step_seconds(mfu) * 1e3:.1f} ms (FLOPs / ({s.chips} x {chip.peak_bf16_tflops:g} TFLOP/s bf16 peak))"),
      (f"{r.num_steps} steps at {mfu:g} % MFU (estimate)", f"{r.num_steps * r.step_seconds(mfu) / 3600:.2f} h"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f"{k:<{width}}  {v}" for k, v in rows]
  if r.error:
    lines.append(f"DOES NOT FIT: the TPU compiler refused: {r.error}")
  elif r.fits(headroom):
    lines.append(f"FITS with {r.headroom:.1f} % of HBM to spare.")
  else:
    lines.append(f"DOES NOT FIT: {r.headroom:.1f} % headroom is under {headroom:g} %; the runtime's own buffers and "
                 f"fragmentation need the margin.")
  return "\n".join(lines)


def fit_hints(r: Report, config: ml_collections.ConfigDict) -> str:
  """What to change, cheapest for step time first (the FLOP costs quoted were counted on sycoca_base)."""
  hints = []
  m, fsdp, accum = config.model, r.mesh["fsdp"], config.grad_accum_steps
  per_chip = r.global_batch // r.slice.chips
  if fsdp < r.slice.chips and r.state_bytes > 0.05 * r.total_bytes:
    hints.append(f"--config.mesh.fsdp={min(r.slice.chips, max(2 * fsdp, 8))} (up to --config.mesh.data=1 "
                 f"--config.mesh.fsdp=-1): split the {r.state_bytes / GIB:.2f} GiB of parameters and optimizer state "
                 f"per chip over more chips (same FLOPs, more gathering of parameters).")
  if not m.remat:
    hints.append("--config.model.remat=True --config.model.remat_policy=dots: keep each layer's matmul outputs, "
                 "recompute attention scores, norms and activations in the backward pass (+1.8 % FLOPs).")
  if per_chip // accum >= 2:
    hints.append(f"--config.grad_accum_steps={2 * accum}: activations of {per_chip // (2 * accum)} examples per chip "
                 f"at a time, contrastive negatives still from the whole batch (one more forward pass of both "
                 f"encoders: +14 % FLOPs).")
  if not m.remat or m.remat_policy != "full":
    hints.append(f"--config.model.remat=True --config.model.remat_policy=full: keep only each layer's input "
                 f"(temporaries now {'at least ' if r.error else ''}{r.temp_bytes / GIB:.2f} GiB; +24 % FLOPs).")
  hints.append(f"--config.global_batch_size={r.global_batch // 2}: fewer examples per chip (changes the recipe), or "
               f"a larger slice.")
  return "To make it fit, try (cheapest for step time first):\n" + "\n".join(f"  {h}" for h in hints)


@dataclasses.dataclass
class LogitsPathReport:
  contrastive: str
  impl: str
  temp_bytes: float           # per chip
  total_bytes: float          # per chip: embeddings in, gradients out, temporaries
  largest_logits: str         # the largest buffer with two batch-sized dimensions (b or B), per chip
  error: str = ""


def compile_logits_path(config: ml_collections.ConfigDict, topology: str) -> tuple[Slice, dict, list]:
  """Compiles value_and_grad of each contrastive loss on [B, E] float32 embeddings for the slice `topology`.

  Returns (slice, mesh shape, one LogitsPathReport per (contrastive, impl)). Nothing of the towers is built.
  """
  slice_ = parse_slice(topology)
  devices = topology_devices(slice_)
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  batch, dim = config.global_batch_size, config.model.embed_dim
  per_device = batch // len(devices)
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  reports = []
  for contrastive in losses.CONTRASTIVE:
    for impl in losses.CONTRASTIVE_IMPLS:
      loss_cfg = config.loss.copy_and_resolve_references()
      loss_cfg.contrastive, loss_cfg.contrastive_impl = contrastive, impl
      # Gradients leave split as the embeddings came, as they flow back into the towers in training.
      fn = jax.jit(jax.value_and_grad(losses.make_contrastive_fn(loss_cfg, mesh), argnums=(0, 1, 2, 3)),
                   out_shardings=(scalar.sharding, (emb.sharding, emb.sharding, scalar.sharding, scalar.sharding)))
      report = LogitsPathReport(contrastive, impl, 0.0, 0.0, "")
      try:
        compiled = fn.lower(emb, emb, scalar, scalar).compile()
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        report.error = str(e).strip().splitlines()[0]
        reports.append(report)
        continue
      mem = compiled.memory_analysis()
      report.temp_bytes = float(mem.temp_size_in_bytes)
      report.total_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                 + mem.temp_size_in_bytes)
      report.largest_logits = _largest_logits(compiled.as_text(), {batch, per_device})
      reports.append(report)
  return slice_, dict(mesh.shape), reports


def _largest_logits(hlo: str, batch_dims: set[int]) -> str:
  """The largest f32 buffer of the compiled (per-chip) program whose last two dimensions are batch sizes."""
  shapes = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[(\d+,\d+)\]", hlo)}
  logits = [s for s in shapes if s[0] in batch_dims and s[1] in batch_dims]
  return "x".join(map(str, max(logits, key=math.prod))) if logits else "-"


def format_logits_table(config: ml_collections.ConfigDict, slice_: Slice, mesh: dict, reports: list) -> str:
  batch, dim = config.global_batch_size, config.model.embed_dim
  hbm = slice_.chip.hbm_gib * GIB
  gib = lambda b: f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.2f} MiB"
  lines = [f"The contrastive loss and its gradient alone: batch {batch} ([B, E] = [{batch}, {dim}] float32 "
           f"embeddings), {slice_.name} ({slice_.chips} chips, mesh {' x '.join(f'{k} {v}' for k, v in mesh.items())},"
           f" {batch // slice_.chips} examples per chip); memory per chip, from the TPU compiler's buffer plan.",
           f"{'loss':<8} {'logits':<8} {'largest logits buffer':>22} {'temporaries':>12} {'total':>12} {'of HBM':>7}"]
  for r in reports:
    if r.error:
      lines.append(f"{r.contrastive:<8} {r.impl:<8} does not fit: {r.error}")
      continue
    lines.append(f"{r.contrastive:<8} {r.impl:<8} {r.largest_logits:>22} {gib(r.temp_bytes):>12} "
                 f"{gib(r.total_bytes):>12} {100 * r.total_bytes / hbm:>6.1f}%")
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS.topology:
    raise app.UsageError("--topology is required, e.g. --topology=v5e-64.")
  config = FLAGS.config
  if FLAGS.logits_path:
    print(format_logits_table(config, *compile_logits_path(config, FLAGS.topology)))
    return
  report = compile_for_slice(config, FLAGS.topology)
  print(format_table(report, FLAGS.headroom, FLAGS.mfu))
  if not report.fits(FLAGS.headroom):
    print(fit_hints(report, config))
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
