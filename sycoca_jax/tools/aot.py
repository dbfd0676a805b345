r"""Compile the train step for a TPU slice (or NVIDIA GPUs) ahead of time, on this machine: per-chip memory, FLOPs,
HBM traffic, the roofline they give, and whether it fits.

  pip install -e ".[tpu]"   # libtpu, the TPU compiler; no TPU is needed
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --topology=v5e-64
  # and where the bytes go, per part of the model:
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --topology=v5e-64 --breakdown
  # how far the compiler's byte count can be trusted, on programs whose traffic is known:
  python -m sycoca_jax.tools.aot --check_cost_model --topology=v5e:2x2
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py:slice=v4-64 --topology=v4-64
  python -m sycoca_jax.tools.aot --config=configs/sycoca_tiny.py:runlocal --topology=v5e:2x2
  # NVIDIA GPUs, compiled by XLA:GPU without a GPU (jax's CUDA plugin, no CUDA libraries: pip install -e ".[gpu_aot]"):
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --topology=h100-8
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

GPUs: `h100-N` / `h200-N` (N GPUs, in hosts of 8 beyond 8) or `h100:2x8` (hosts x GPUs per host), compiled by
XLA:GPU from jax's CUDA plugin for the card GPU_TARGETS describes: no GPU, driver or CUDA library is needed, and
memory (the buffer plan, against the card's memory), FLOPs and the roofline (NVIDIA's peaks) come as for TPUs.
What a compile without the GPU cannot do: autotune (each kernel gets a default tiling, and Triton matmul fusions
fail with it, so matmuls are cuBLAS calls: GPU_COMPILER_OPTIONS; cuBLAS and cuDNN pick no algorithm); nor give
XLA:GPU's own cost analysis (the HBM traffic is XLA's target-independent count of the GPU program, with the
library calls' bytes and FLOPs estimated from their shapes: compiled_cost). cuDNN's flash attention
(model.attention_impl='cudnn') compiles to cuDNN calls, whose bytes are counted and FLOPs are not.

--logits_path compiles, instead of the step, the contrastive loss and its gradient alone, on the global batch's
[B, E] embeddings split over the config's mesh as training splits them (the same program serves gradient
accumulation, which takes this loss on the whole batch's cached embeddings), for each of softmax / sigmoid and
the dense formula / the sharded one (config.loss.contrastive_impl), and prints their per-chip memory: what
the [B, B] logits cost without compiling the towers (minutes per slice for sycoca_base).

FLOPs per step: XLA's HLO cost analysis of the step lowered on this host with every layer unrolled (a scanned
layer would be counted once, and a TPU lowering reports no count before compilation). It counts what the step
executes: remat's recomputation included, and with gradient accumulation the extra forward pass of both encoders
(the accumulation loop itself would also be counted once, so the whole batch is counted in one piece). The table
gives it for the slice and per chip (divided by the chip count: the data and fsdp axes both split the batch); the
TPU compiler's own count for one chip's compiled program is printed beside it as a cross-check.

HBM traffic per chip: the TPU compiler's cost analysis of the compiled (per-chip) program, its "bytes accessed":
every read and write of device memory it plans in one step. A scanned layer's would be counted once.

The roofline, per chip: compute time = FLOPs per chip / the chip's bf16 peak, memory time = HBM bytes / its HBM
bandwidth (CHIPS: Google Cloud's published per-chip figures, printed below the table). The larger is the bound;
the MFU ceiling is compute time / max(compute time, memory time), the best model FLOPs utilisation the traffic
allows. The step time and run time the tool gives are estimates from the bound alone: the bound's time, as if it
ran at peak with the other hidden under it; a real step is slower.

--breakdown prints where the bytes and FLOPs of the compiled step go, per part of the model (attention, layer
norms, MLPs, vocabulary logits, TG-MIM decoder, masking gathers, collectives, optimizer update, ...: ops are
mapped by the flax module path and named scope in their op_name metadata, PARTS) and its top ops. XLA reports
its cost analysis for the whole program only, so per op the bytes are an estimate made from the optimised HLO
text: each op's operand and result shapes (hlo_costs says where that over- or undercounts); the table prints the
estimate's total beside the compiler's. --check_cost_model compiles a few programs whose least traffic is known
(a bf16 matmul, a float32 elementwise op, layer norms) for one chip and prints the compiler's count, the
estimate and the analytic bytes side by side.
"""

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Optional

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
  flags.DEFINE_string("topology", None, "TPU slice: v4-64, v5e-64, v5p-32, v6e-64, ... or v5e:8x8; or NVIDIA GPUs: "
                      "h100-8, h200-16, ... or h100:2x8 (hosts x GPUs per host).")
  flags.DEFINE_float("headroom", 15.0,
                     "Percent of the chip's HBM that must stay free for the step to count as fitting.")
  flags.DEFINE_bool("breakdown", False, "Also print where the compiled step's HBM bytes and FLOPs go: per part of "
                    "the model, and its top ops by bytes and by FLOPs.")
  flags.DEFINE_bool("check_cost_model", False, "Only compile a few programs whose HBM traffic is known, for one chip "
                    "of --topology (default v5e), and print the compiler's count of their bytes against it.")
  flags.DEFINE_string("hlo_out", None, "Also write the compiled step's optimised HLO text to this file (what the "
                      "breakdown reads; for reading further, e.g. grep by op_name).")
  flags.DEFINE_bool("logits_path", False, "Compile only the contrastive loss (every ITC option) and print its "
                    "per-chip memory, instead of the train step.")


GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  cores_in_name: int        # what one chip counts for in Cloud's slice name (GPUs: 1)
  torus_dims: int           # TPUs; 0 for GPUs, which are counted as hosts x GPUs per host
  hbm_gib: float            # what the TPU compiler plans with (its out-of-memory message); GPUs: the card's memory
  peak_bf16_tflops: float   # dense bf16 peak per chip, TFLOP/s (Google Cloud's / NVIDIA's published figure)
  hbm_gbps: float           # HBM bandwidth per chip, GB/s = 1e9 bytes/s (Google Cloud's / NVIDIA's published figure)
  chip_config: str = ""     # libtpu's chip_config_name; v4 runs its two TensorCores as one device (megacore)
  platform: str = "tpu"     # the compiler's: 'tpu' (libtpu) or 'cuda' (XLA:GPU, from jax's CUDA plugin)

  @property
  def compiler(self) -> str:
    return "TPU compiler" if self.platform == "tpu" else "GPU compiler"

  @property
  def cost_source(self) -> str:
    """Whose count of the compiled program's FLOPs and bytes the table gives (compiled_cost)."""
    return "the TPU compiler" if self.platform == "tpu" else "XLA's cost analysis of the GPU program"

  @property
  def ridge(self) -> float:
    """FLOP per byte of HBM traffic above which a program is compute-bound on this chip."""
    return self.peak_bf16_tflops * 1e12 / (self.hbm_gbps * 1e9)


CHIPS = {
    "v4": Chip(cores_in_name=2, torus_dims=3, hbm_gib=30.75, peak_bf16_tflops=275, hbm_gbps=1228,
               chip_config="megacore"),
    "v5e": Chip(cores_in_name=1, torus_dims=2, hbm_gib=15.75, peak_bf16_tflops=197, hbm_gbps=819),
    "v5p": Chip(cores_in_name=2, torus_dims=3, hbm_gib=95.74, peak_bf16_tflops=459, hbm_gbps=2765),
    "v6e": Chip(cores_in_name=1, torus_dims=2, hbm_gib=31.25, peak_bf16_tflops=918, hbm_gbps=1640),
    # SXM cards, NVIDIA's data sheets: dense (not 2:4 sparse) bf16 tensor-core peak; memory as GPU_TARGETS gives it.
    "h100": Chip(cores_in_name=1, torus_dims=0, hbm_gib=79.11, peak_bf16_tflops=989, hbm_gbps=3350, platform="cuda"),
    "h200": Chip(cores_in_name=1, torus_dims=0, hbm_gib=141.0, peak_bf16_tflops=989, hbm_gbps=4800, platform="cuda"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
GPUS_PER_HOST = 8   # an HGX board: a GPU name's count beyond 8 is hosts of 8

# What XLA:GPU needs to know of a card to compile for it without one (stream_executor.GpuTargetConfigProto, text
# format: jax's CUDA plugin takes it as the topology's target_config): the figures it plans fusions, tiles and
# schedules with. Hopper's (compute capability 9.0a: 132 SMs at 1.98 GHz, 50 MiB L2, 228 KiB shared memory per SM)
# are common to both cards; memory size and bandwidth are each card's, as XLA's own target specs of them give
# them (device_memory_size in bytes, memory_bandwidth in bytes/s). The cuDNN version is the one the compiler may
# assume when it chooses library kernels.
_HOPPER_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448 shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  device_vendor: "NVIDIA Corporation" platform_version: "Compute Capability 9.0a" name: "{name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{name}"
"""
# Without a GPU, XLA:GPU cannot autotune: every Triton matmul fusion gets one default tiling, with which this
# version fails on the attention's output projection ("Couldn't find output tile sizes": the heads' merging
# transpose fused into the matmul); with a GPU the autotuner would pass over that tiling or fall back to cuBLAS.
# Compiled for GPUs, matmuls are therefore cuBLAS calls, as the autotuner may also choose.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
GPU_TARGETS = {
    "h100": _HOPPER_TARGET.format(name="NVIDIA H100 80GB HBM3", memory=84942979072, bandwidth=3352320000000),
    "h200": _HOPPER_TARGET.format(name="NVIDIA H200 141GB HBM3e", memory=151397597184, bandwidth=4800000000000),
}


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
  """'v4-64' / 'v5e-64' / 'v5litepod-64' / 'v5e:8x8' -> the slice's generation, libtpu topology and chip count;
  'h100-16' / 'h100:2x8' -> GPUs as hosts x GPUs per host."""
  m = re.fullmatch(r"([a-z]+\d+[a-z]*)([-:])([0-9x]+)", name.strip().lower())
  generation = m and ALIASES.get(m.group(1), m.group(1))
  if not m or generation not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected e.g. v4-64, v5e-64, v5p-32, v6e-64, v5e:8x8, h100-8 or "
                     f"h100:2x8 (generations {sorted(CHIPS)}).")
  chip = CHIPS[generation]
  if not chip.torus_dims:
    dims = [int(d) for d in m.group(3).split("x")]
    if m.group(2) == "-" and len(dims) == 1 and (dims[0] <= GPUS_PER_HOST or not dims[0] % GPUS_PER_HOST):
      dims = [max(1, dims[0] // GPUS_PER_HOST), min(dims[0], GPUS_PER_HOST)]
    if len(dims) != 2 or not all(dims):
      raise ValueError(f"--topology={name!r}: GPUs are given as {generation}-N (N up to {GPUS_PER_HOST}, or a "
                       f"multiple of {GPUS_PER_HOST}) or {generation}:HOSTSxGPUS, e.g. {generation}:2x8.")
    return Slice(name, generation, f"{generation}:{dims[0]}x{dims[1]}", math.prod(dims))
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


def compile_lowered(lowered: Any, slice_: Slice) -> Any:
  """lowered.compile(), with the options the slice's compiler needs here (GPU_COMPILER_OPTIONS for GPUs)."""
  return lowered.compile(GPU_COMPILER_OPTIONS if slice_.chip.platform == "cuda" else None)


def topology_devices(slice_: Slice) -> list[Any]:
  """The slice's compile-only devices (one per chip), from libtpu or, for GPUs, jax's CUDA plugin."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if slice_.chip.platform == "cuda":
    # The plugin's topology is partitions x hosts x GPUs per host, for the card GPU_TARGETS describes: XLA:GPU then
    # compiles without a GPU (and without CUDA's libraries).
    try:
      topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{slice_.topology_name.split(':')[1]}",
                                              target_config=GPU_TARGETS[slice_.generation])
    except NotImplementedError as e:
      raise RuntimeError("jax's CUDA plugin (XLA:GPU) is not installed: pip install -e '.[gpu_aot]' (no GPU or CUDA "
                         "libraries needed).") from e
    return list(topology.devices)
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


@dataclasses.dataclass(frozen=True)
class Roofline:
  """One chip's share of a step against the chip's two roofs, its bf16 peak and its HBM bandwidth.

  compute time = FLOPs / peak and memory time = HBM bytes / bandwidth. The step can take no less than the larger
  of the two (its bound), and takes that long only if the bound runs at its peak with the other hidden under it:
  `step_seconds` is therefore an optimistic estimate, a lower bound, and `mfu_ceiling` the highest model FLOPs
  utilisation that the step's HBM traffic allows (1 when compute-bound).
  """

  flops: float        # per chip and step
  hbm_bytes: float    # per chip and step
  chip: Chip

  @property
  def compute_seconds(self) -> float:
    return self.flops / (self.chip.peak_bf16_tflops * 1e12)

  @property
  def memory_seconds(self) -> float:
    return self.hbm_bytes / (self.chip.hbm_gbps * 1e9)

  @property
  def step_seconds(self) -> float:
    return max(self.compute_seconds, self.memory_seconds)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

  @property
  def mfu_ceiling(self) -> float:
    """A fraction: compute time / max(compute time, memory time)."""
    return self.compute_seconds / self.step_seconds

  @property
  def intensity(self) -> float:
    """FLOP per byte of HBM traffic; above the chip's ridge point the step is compute-bound."""
    return self.flops / self.hbm_bytes


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
  flops_per_step: float       # whole slice, XLA's count on the host lowering (count_flops)
  bytes_accessed: float       # per chip, the compiled program's HBM reads and writes (the TPU compiler's count)
  scanned: bool
  num_steps: int
  compile_s: float
  compiled_flops: float = 0.0  # per chip, the TPU compiler's own count on the compiled program (a cross-check)
  hbm_placed_bytes: float = 0.0  # per chip, operands and results in HBM only, once each (hlo_costs: an estimate)
  optimal_seconds: float = 0.0   # the TPU compiler's own estimate of the step's time (cost analysis)
  library_calls: int = 0      # GPUs: cuBLAS / cuDNN calls, whose costs are estimated (compiled_cost)
  error: str = ""             # the compiler's out-of-memory message, when it refused
  ops: Optional[list["OpCost"]] = None  # per op of the compiled program (compile_for_slice(breakdown=True))

  @property
  def headroom(self) -> float:
    return 100.0 * (1.0 - self.total_bytes / (self.slice.chip.hbm_gib * GIB))

  def fits(self, headroom: float) -> bool:
    return not self.error and self.headroom >= headroom

  @property
  def roofline(self) -> Optional[Roofline]:
    """Per chip: the step's FLOPs split evenly (data and fsdp both split the batch) and the compiled program's HBM
    traffic. None where the traffic is unknown (the compiler refused) or undercounted (layers scanned)."""
    if self.error or self.scanned or not self.bytes_accessed:
      return None
    return Roofline(self.flops_per_step / self.slice.chips, self.bytes_accessed, self.slice.chip)


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
  flops = _lowered_flops(step.step, step.abstract_state, step.abstract_batch, step.schedule_args)
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


def compiled_cost(compiled: Any, ops: Optional[list["OpCost"]] = None) -> dict[str, float]:
  """The cost analysis of a compiled program: 'flops', 'bytes accessed' (its HBM reads and writes) per device.

  The TPU compiler gives its own. XLA:GPU compiling without a GPU gives none (UNIMPLEMENTED: GetCostAnalysis), so
  for GPUs this is XLA's HLO cost analysis (the target-independent one) run on the GPU-compiled program's
  optimised HLO: each kernel (a fusion, a collective) reads its operands and writes its result in HBM, as the GPU
  compiler planned them; what happens inside a kernel (L2 cache reuse) is not seen. That analysis cannot see into
  library calls (cuBLAS matmuls, cuDNN convolutions) and counts each as -1 FLOPs and -1 bytes: they are put back
  as hlo_costs estimates them, bytes from their operands and results (less the library's scratch workspace) and
  FLOPs from their shapes ('library calls' says how many there are).
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost:
    return cost
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  module, = compiled.runtime_executable().hlo_modules()
  cost = dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
  ops = hlo_costs(compiled.as_text()) if ops is None else ops   # the caller's, when it has them: parsed once
  calls = [o for o in ops if o.opcode == "custom-call"]
  cost["bytes accessed"] = cost.get("bytes accessed", 0.0) + sum(1.0 + o.bytes for o in calls)
  cost["flops"] = cost.get("flops", 0.0) + sum(1.0 + o.flops for o in calls)
  cost["library calls"] = float(len(calls))
  return cost


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


def compile_for_slice(config: ml_collections.ConfigDict, topology: str, breakdown: bool = False,
                      hlo_out: Optional[str] = None) -> Report:
  """Lowers and compiles the train step of `config` for the TPU slice `topology`; nothing runs.

  `breakdown`: also estimate each compiled op's bytes and FLOPs (Report.ops, hlo_costs). `hlo_out`: a file to
  write the optimised HLO text to.
  """
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
    compiled = compile_lowered(step.step.lower(step.abstract_state, step.abstract_batch, step.schedule_args), slice_)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.compile_s = time.perf_counter() - t
    report.error = str(e).strip().splitlines()[0]
    report.total_bytes, report.temp_bytes = _refused_bytes(report)
    return report
  report.compile_s = time.perf_counter() - t
  hlo = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo)
  ops = hlo_costs(hlo)
  cost = compiled_cost(compiled, ops)
  report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
  report.compiled_flops = float(cost.get("flops", 0.0))
  report.optimal_seconds = float(cost.get("optimal_seconds", 0.0))
  report.hbm_placed_bytes = sum(op.bytes for op in ops)
  report.library_calls = int(cost.get("library calls", 0))
  if breakdown:
    report.ops = ops
  mem = compiled.memory_analysis()
  report.temp_bytes = float(mem.temp_size_in_bytes)
  report.total_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                             + mem.temp_size_in_bytes)
  return report


def format_table(r: Report, headroom: float) -> str:
  chip, s = r.slice.chip, r.slice
  hbm = chip.hbm_gib
  per_chip = r.global_batch // s.chips
  micro = f", {r.accum} micro-batches of {per_chip // r.accum}" if r.accum > 1 else ""
  gib = lambda b: f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2 ** 20:.1f} MiB"
  flops = lambda f: f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.3f} GFLOP"
  ms = lambda seconds: f"{seconds * 1e3:.1f} ms"
  compiler_flops = f"; {chip.cost_source} counts {flops(r.compiled_flops)} per chip" if r.compiled_flops else ""
  if r.library_calls:
    compiler_flops += f", its {r.library_calls} cuBLAS / cuDNN calls' from their shapes"
  budget = ("the TPU compiler's budget" if chip.platform == "tpu" else
            "the card's; JAX's allocator takes 75 % of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise")
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
                          f"({budget})"),
      ("HBM headroom", f"{r.headroom:.1f} % (needed: {headroom:g} %)"),
      ("FLOPs per step (XLA, layers unrolled)",
       f"{flops(r.flops_per_step)} on the slice, {flops(r.flops_per_step / s.chips)} per chip "
       f"({flops(r.flops_per_step / r.global_batch)} per example){compiler_flops}"),
      (f"HBM traffic per chip ({chip.cost_source.removeprefix('the ')})",
       "n/a" if r.error else f"{gib(r.bytes_accessed)} per step"
                             + (" (a scanned layer counted once)" if r.scanned else "")),
      ("compile time", f"{r.compile_s:.0f} s"),
  ]
  roof = r.roofline
  if roof is None:
    rows.append(("roofline", "n/a: " + ("the compiler refused the step" if r.error else
                                        "a scanned layer's traffic is counted once; compile with "
                                        "--config.model.scan_layers=False")))
  else:
    rows += [
        ("per chip: arithmetic intensity", f"{roof.intensity:.0f} FLOP per byte of HBM traffic "
                                           f"({s.generation} ridge point: {chip.ridge:.0f})"),
        ("per chip: compute time", f"{ms(roof.compute_seconds)} (FLOPs per chip / {chip.peak_bf16_tflops:g} "
                                   f"TFLOP/s bf16 peak)"),
        ("per chip: memory time", f"{ms(roof.memory_seconds)} (HBM bytes per chip / {chip.hbm_gbps:,g} GB/s)"),
        ("bound", roof.bound),
        ("MFU ceiling", f"{100 * roof.mfu_ceiling:.1f} % (compute time / max(compute, memory time))"),
        ("step time at the roofline (estimate)",
         f"{ms(roof.step_seconds)}, the {roof.bound} time: a lower bound, reached only at the chip's peak with "
         f"the other time hidden under it"),
        (f"the config's {r.num_steps} steps at the roofline (estimate)",
         f"{r.num_steps * roof.step_seconds / 3600:.2f} h"),
    ]
    # The compiler's byte count does not tell memory spaces apart (see check_cost_model): two other views.
    if r.hbm_placed_bytes:
      placed = Roofline(roof.flops, r.hbm_placed_bytes, chip)
      rows.append(("HBM-placed buffers only (HLO estimate)",
                   f"{gib(r.hbm_placed_bytes)} per step, memory time {ms(placed.memory_seconds)}: {placed.bound}-"
                   f"bound, MFU ceiling {100 * placed.mfu_ceiling:.1f} % (each operand and result in HBM read or "
                   f"written once; buffers placed on chip left out)"))
    if r.optimal_seconds > 0:  # on a whole train step the TPU compiler reports a negative time: none is printed
      rows.append(("the TPU compiler's step-time estimate", f"{ms(r.optimal_seconds)} (its cost analysis' "
                   f"optimal_seconds): MFU {100 * roof.compute_seconds / r.optimal_seconds:.1f} % at that time"))
  width = max(len(k) for k, _ in rows)
  lines = [f"{k:<{width}}  {v}" for k, v in rows]
  if r.error:
    lines.append(f"DOES NOT FIT: the {chip.compiler} refused: {r.error}")
  elif r.fits(headroom):
    lines.append(f"FITS with {r.headroom:.1f} % of HBM to spare.")
  else:
    lines.append(f"DOES NOT FIT: {r.headroom:.1f} % headroom is under {headroom:g} %; the runtime's own buffers and "
                 f"fragmentation need the margin.")
  return "\n".join(lines)


def format_peaks(generation: str = "") -> str:
  """The roofline's figures per chip generation (Google Cloud's and NVIDIA's published per-chip specifications);
  `generation` is marked."""
  lines = ["Per chip, as Google Cloud and NVIDIA publish them:",
           f"  {'chip':<5} {'bf16 TFLOP/s':>12} {'HBM GB/s':>9} {'ridge FLOP/byte':>16}"]
  for name, chip in CHIPS.items():
    lines.append(f"{'*' if name == generation else ' '} {name:<5} {chip.peak_bf16_tflops:>12,g} {chip.hbm_gbps:>9,g} "
                 f"{chip.ridge:>16.0f}")
  return "\n".join(lines)


def _accepts(config: ml_collections.ConfigDict, **changes) -> bool:
  """Whether the config still validates with `changes` (terms over the whole batch refuse gradient accumulation)."""
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.update(changes)
  try:
    config_lib.validate(changed)
  except ValueError:
    return False
  return True


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
  if per_chip // accum >= 2 and _accepts(config, grad_accum_steps=2 * accum):
    hints.append(f"--config.grad_accum_steps={2 * accum}: activations of {per_chip // (2 * accum)} examples per chip "
                 f"at a time, contrastive negatives still from the whole batch (one more forward pass of both "
                 f"encoders: +14 % FLOPs).")
  if not m.remat or m.remat_policy != "full":
    hints.append(f"--config.model.remat=True --config.model.remat_policy=full: keep only each layer's input "
                 f"(temporaries now {'at least ' if r.error else ''}{r.temp_bytes / GIB:.2f} GiB; +24 % FLOPs).")
  hints.append(f"--config.global_batch_size={r.global_batch // 2}: fewer examples per chip (changes the recipe), or "
               f"a larger slice.")
  return "To make it fit, try (cheapest for step time first):\n" + "\n".join(f"  {h}" for h in hints)


# -- Where the bytes go: the compiled program, op by op. --------------------------------------------------------

# Bytes per element of HLO's element types (s4 / u4 pack two to a byte).
_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# An array and its layout, e.g. bf16[64,772,768]{2,1,0:T(8,128)(2,1)S(1)}: S(n), n > 0, is a memory space other
# than HBM (the TPU's on-chip VMEM and SMEM, or host memory), where the memory-space assignment put the buffer.
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^{}]*\})?")
_OFF_HBM = re.compile(r"S\([1-9]\d*\)")
# Instructions that move no data of their own: naming, tuple plumbing, layout-only bitcasts, the second half of
# an asynchronous pair (its bytes are counted at the start).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "copy-done", "slice-done", "async-done", "async-update", "send-done",
         "recv-done"}
# Custom calls that only rename memory: ConcatBitcast views operands written in place as one buffer.
_FREE_CUSTOM_CALLS = {"ConcatBitcast"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# The model's parts, from an op's opcode and JAX's name stack (its op_name metadata: flax module paths and named
# scopes, which autodiff wraps as jvp(name) / transpose(jvp(name))); ordered, the first match wins. The TG-MIM
# decoder and the vocabulary logits are parts of their own whatever their ops; attention, norms and MLPs are those
# of the other towers. A gather or sort outside those (the masking's argsort and gathers) counts as masking.
PARTS = (
    ("FSDP gathers / collectives", r"^(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"),
    ("prefetches / spills (on-chip memory)", r"^(copy-start|slice-start) //$"),
    ("optimizer update", r"/optimizer/"),
    ("TG-MIM decoder", r"/image_decoder/"),
    ("vocabulary logits + caption loss", r"/text_decoder/(?!transformer/)|[/(]caption_loss[/)]"),
    ("losses (contrastive, TG-MIM)", r"[/(](contrastive_loss|mim_loss)[/)]"),
    ("token embedding", r"/token_embedding/"),
    ("masking gathers", r"[/(](choose_masks|masking)[/)]|/(gather|sort|scatter|scatter-add)/"),
    ("patch embedding / stem", r"/image_encoder/(conv1|conv_stem|patch_cnn)/"),
    ("attention", r"/attn/"),
    ("layer norms", r"/(ln_\w*|norm\w*|LayerNorm_\d+)/"),
    ("MLPs", r"/mlp/"),
    ("other", r""),
)


@dataclasses.dataclass(frozen=True)
class OpCost:
  """One instruction of the compiled (per-chip) program, with what it costs per step."""

  name: str
  opcode: str         # 'fusion' gives its kind, e.g. 'fusion kOutput'
  shape: str          # its result, element types and dimensions only
  op_name: str        # JAX's name stack, from the op's metadata
  bytes: float        # operands + result, times the trip count of the loops around it (an estimate)
  flops: float        # of its matmuls and convolutions, times the trip count of the loops around it

  @property
  def part(self) -> str:
    key = f"{self.opcode} /{self.op_name}/"
    return next(part for part, pattern in PARTS if re.search(pattern, key))


def _matching(text: str, start: int) -> int:
  """The index just past the bracket that closes text[start] ('(' or '{')."""
  close = {"(": ")", "{": "}"}[text[start]]
  depth = 0
  for i in range(start, len(text)):
    if text[i] == text[start]:
      depth += 1
    elif text[i] == close:
      depth -= 1
      if not depth:
        return i + 1
  return len(text)


def _array_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of every array in an HLO shape (tuples summed), logical sizes: layouts' tile padding is ignored.

  `hbm_only`: leave out arrays that the layout places in another memory space than HBM (on-chip memory).
  """
  total = 0.0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
    if hbm_only and _OFF_HBM.search(layout):
      continue
    total += _ELEMENT_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str


def _parse_hlo(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
  """Computations of an HLO module's text, by name, and the entry computation's name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    stripped = line.strip()
    header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{$", stripped)
    if current is None and header and "=" not in stripped.split("->")[0].split("(")[0]:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    if stripped == "}":
      current = None
      continue
    m = re.match(r"(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", stripped)
    if current is None or not m:
      continue
    rest = stripped[m.end():]
    end = _matching(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode = rest[:rest.index("(")]
    close = _matching(rest, len(opcode))
    operands = re.findall(r"%([\w.\-]+)", rest[len(opcode):close])
    current.append(_Instruction(m.group(1), shape, opcode, operands, rest[close:]))
  return computations, entry


def _dot_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of a dot or convolution: result elements x the size of what each one sums over."""
  out = math.prod(_dims(inst.shape))
  lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
  if inst.opcode == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    idx = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
    return 2.0 * out * math.prod(lhs[i] for i in idx if i < len(lhs))
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
  window = re.search(r"window=\{size=([\dx]+)", inst.attrs)
  groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
  if not labels or "f" not in labels.group(1) or len(labels.group(1)) != len(lhs):
    return 0.0
  features = lhs[labels.group(1).index("f")] // (int(groups.group(1)) if groups else 1)
  sizes = [int(d) for d in window.group(1).split("x")] if window else []
  # The TPU compiler writes a batched matmul (attention's) as a convolution whose batch dimensions are spatial,
  # window size = input dilation: of a window's taps only one per dilation step meets an input element.
  dilate = re.search(r"lhs_dilate=([\dx]+)", inst.attrs)
  dilations = [int(d) for d in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
  taps = math.prod(-(-size // d) for size, d in zip(sizes, dilations))
  return 2.0 * out * features * taps


def _library_flops(inst: _Instruction, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of a GPU library call: a cuBLAS matmul (its backend config names the contracting dimensions)
  or a cuDNN forward convolution (window and dim_labels as a convolution's); 0 for anything else (cuDNN's
  backward convolutions among them)."""
  if "__cublas" in inst.attrs:
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
    idx = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
    return 2.0 * math.prod(_dims(inst.shape)) * math.prod(lhs[i] for i in idx if i < len(lhs))
  if "__cudnn$convForward" in inst.attrs:
    return _dot_flops(inst, shapes)
  return 0.0


def hlo_costs(hlo: str) -> list[OpCost]:
  """Per instruction of a compiled HLO module's text: estimated HBM bytes and matmul FLOPs per run.

  XLA exposes its cost analysis for the whole program only, so this estimate is made from the optimised HLO:
  each op that runs on its own (a fusion, a collective, a copy, a custom call, ...) reads its operands and
  writes its result, once; ops inside a loop body count once per trip. That is an upper bound where a fusion
  reads only a slice of an operand, or updates a buffer in place, and it counts buffers that the memory-space
  assignment keeps on chip as HBM traffic, so its sum need not match the compiler's total: the breakdown
  prints both. FLOPs are those of dots and convolutions (2 per multiply-add); elementwise work is left out.
  """
  computations, entry = _parse_hlo(hlo)
  ops: list[OpCost] = []

  def flops_in(computation: str) -> float:
    insts = computations.get(computation, [])
    shapes = {i.name: i.shape for i in insts}
    total = 0.0
    for inst in insts:
      if inst.opcode in ("dot", "convolution"):
        total += _dot_flops(inst, shapes)
      for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", inst.attrs):
        total += flops_in(called)
    return total

  def walk(computation: str, trips: float) -> None:
    insts = computations.get(computation, [])
    shapes = {i.name: i.shape for i in insts}
    for inst in insts:
      attrs = inst.attrs
      if inst.opcode == "while":
        count = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        body = re.search(r"body=%?([\w.\-]+)", attrs)
        if body:
          walk(body.group(1), trips * (int(count.group(1)) if count else 1))
        continue
      if inst.opcode in ("call", "conditional", "async-start"):
        called = re.findall(r"(?:to_apply|calls|branch_computations=\{|true_computation|false_computation)="
                            r"?%?([\w.\-]+)", attrs)
        for c in called[:1] if inst.opcode == "conditional" else called:
          walk(c, trips)
        continue
      if inst.opcode in _FREE or re.search(r'custom_call_target="(%s)"' % "|".join(_FREE_CUSTOM_CALLS), attrs):
        continue
      # Only HBM counts: an operand or result that the memory-space assignment keeps on chip costs no traffic.
      operand_bytes = sum(_array_bytes(shapes.get(o, ""), hbm_only=True) for o in inst.operands)
      result_bytes = _array_bytes(inst.shape, hbm_only=True)
      if inst.opcode == "slice-start":
        # An asynchronous slice (a prefetch into on-chip memory) reads its slice of the operand, not all of it.
        operand_bytes, result_bytes = _array_bytes(inst.shape) - _array_bytes(shapes.get(inst.operands[0], "")), 0.0
      elif inst.opcode.endswith("-start") and inst.shape.startswith("("):
        # An asynchronous op's result holds its operands and its output (and small context): the operands are
        # counted already.
        result_bytes -= sum(_array_bytes(shapes.get(o, ""), hbm_only=True) for o in inst.operands)
      arrays = _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", inst.shape))
      if inst.opcode == "custom-call" and len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
        # A GPU library call's (cuBLAS, cuDNN) last result is its scratch workspace, not data it reads or writes.
        result_bytes -= _array_bytes(f"{arrays[-1][0]}[{arrays[-1][1]}]")
      flops = 0.0
      if inst.opcode == "fusion":
        fused = re.search(r"calls=%?([\w.\-]+)", attrs)
        flops = flops_in(fused.group(1)) if fused else 0.0
      elif inst.opcode in ("dot", "convolution"):
        flops = _dot_flops(inst, shapes)
      elif inst.opcode == "custom-call":
        flops = _library_flops(inst, shapes)
      kind = re.search(r"kind=(\w+)", attrs)
      op_name = re.search(r'op_name="([^"]*)"', attrs)
      ops.append(OpCost(
          name=inst.name, opcode=f"fusion {kind.group(1)}" if inst.opcode == "fusion" and kind else inst.opcode,
          shape=" ".join(f"{t}[{d}]" for t, d in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", inst.shape))),
          op_name=op_name.group(1) if op_name else "", bytes=trips * (operand_bytes + max(result_bytes, 0.0)),
          flops=trips * flops))

  walk(entry, 1.0)
  return ops


def format_breakdown(ops: list[OpCost], compiled_bytes: float, compiled_flops: float, top: int = 15) -> str:
  """Per model part, then the top ops by bytes and by FLOPs: the estimate's share of each, per chip and step."""
  total_bytes = sum(o.bytes for o in ops) or 1.0
  total_flops = sum(o.flops for o in ops) or 1.0
  gib = lambda b: f"{b / GIB:8.2f}"
  lines = [f"Where the bytes go, per chip and step (estimated from the optimised HLO's operand and result shapes: "
           f"{total_bytes / GIB:.2f} GiB, the compiler's count {compiled_bytes / GIB:.2f} GiB; matmul and "
           f"convolution FLOPs {total_flops / 1e12:.3f} TFLOP, the compiler's count of all FLOPs "
           f"{compiled_flops / 1e12:.3f} TFLOP):",
           f"{'part':<34} {'GiB':>8} {'bytes %':>7} {'TFLOP':>8} {'FLOPs %':>7} {'FLOP/byte':>9} {'ops':>5}"]
  parts: dict[str, list[OpCost]] = {}
  for o in ops:
    parts.setdefault(o.part, []).append(o)
  for part, members in sorted(parts.items(), key=lambda kv: -sum(o.bytes for o in kv[1])):
    b, f = sum(o.bytes for o in members), sum(o.flops for o in members)
    lines.append(f"{part:<34} {gib(b)} {100 * b / total_bytes:>7.1f} {f / 1e12:>8.3f} {100 * f / total_flops:>7.1f} "
                 f"{f / b if b else 0:>9.0f} {len(members):>5}")
  short = lambda name: re.sub(r"^(jit\([^)]*\)/)+", "", name)[-90:]
  for key, label in ((lambda o: o.bytes, "bytes"), (lambda o: o.flops, "FLOPs")):
    lines += ["", f"Top {top} ops by {label}:",
              f"{'GiB':>8} {'GFLOP':>9} {'part':<34} {'op':<16} {'result':<28} op_name (JAX name stack)"]
    for o in sorted(ops, key=key, reverse=True)[:top]:
      lines.append(f"{gib(o.bytes)} {o.flops / 1e9:>9.1f} {o.part:<34} {o.opcode:<16} {o.shape[:28]:<28} "
                   f"{short(o.op_name)}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class CostCheck:
  program: str
  compiler_bytes: float   # the TPU compiler's cost analysis ('bytes accessed')
  estimate_bytes: float   # hlo_costs' sum over the compiled program
  analytic_bytes: float   # one read of every input and one write of every output
  compiler_seconds: float = 0.0   # the compiler's own estimate of the program's time ('optimal_seconds')
  roofline_seconds: float = 0.0   # max(FLOPs / bf16 peak, analytic bytes / HBM bandwidth)


def check_cost_model(topology: str = "v5e:2x2") -> list[CostCheck]:
  """Compiles, for the first chip of `topology`, programs whose least HBM traffic is known, and sets the TPU
  compiler's count of their bytes (and the breakdown's estimate) against it.

  A bf16 matmul reads both operands and writes the product once, an elementwise a * b + 1 reads two arrays and
  writes one, and a layer norm (flax's, as the towers use it: float32 statistics) reads its input, scale and
  bias and writes its output once, if the compiler keeps the statistics on chip. A ratio above 1 is traffic the
  compiler plans (or counts) beyond that.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  slice_ = parse_slice(topology)
  device = topology_devices(slice_)[0]
  on_chip = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)
  nbytes = lambda *specs: float(sum(math.prod(a.shape) * a.dtype.itemsize for a in specs))
  m = k = n = 4096
  rows, width = 8192, 768
  programs = []
  a, b = spec((m, k), jnp.bfloat16), spec((k, n), jnp.bfloat16)
  programs.append((f"bf16 matmul [{m},{k}] x [{k},{n}]", lambda x, y: x @ y, (a, b),
                   nbytes(a, b, spec((m, n), jnp.bfloat16))))
  a = spec((m, n), jnp.float32)
  programs.append((f"f32 a * b + 1 on [{m},{n}]", lambda x, y: x * y + 1, (a, a), nbytes(a, a, a)))
  for dtype in (jnp.float32, jnp.bfloat16):
    norm = nn.LayerNorm(dtype=dtype)
    x = spec((rows, width), dtype)
    params = jax.tree.map(lambda p: spec(p.shape, p.dtype), jax.eval_shape(norm.init, jax.random.PRNGKey(0), x))
    programs.append((f"{jnp.dtype(dtype).name} layer norm [{rows},{width}]",
                     lambda p, y, norm=norm: norm.apply(p, y), (params, x),
                     nbytes(x, x, *jax.tree.leaves(params))))
  checks = []
  for name, fn, args, analytic in programs:
    compiled = compile_lowered(jax.jit(fn).lower(*args), slice_)
    ops = hlo_costs(compiled.as_text())
    cost = compiled_cost(compiled, ops)
    roof = Roofline(float(cost.get("flops", 0.0)), analytic, slice_.chip)
    checks.append(CostCheck(name, float(cost["bytes accessed"]), sum(o.bytes for o in ops),
                            analytic, float(cost.get("optimal_seconds", 0.0)), roof.step_seconds))
  return checks


def format_cost_checks(checks: list[CostCheck], topology: str) -> str:
  mib = lambda b: f"{b / 2 ** 20:10.1f}"
  us = lambda t: f"{t * 1e6:13.0f}"
  lines = [f"HBM bytes of programs with known traffic, compiled for one chip of {topology} (MiB; estimate: the "
           f"breakdown's, HBM-placed buffers only), and their time (us; roofline: from the analytic bytes):",
           f"{'program':<34} {'compiler':>10} {'estimate':>10} {'analytic':>10} {'compiler / analytic':>20} "
           f"{'compiler time':>13} {'roofline time':>13}"]
  for c in checks:
    lines.append(f"{c.program:<34} {mib(c.compiler_bytes)} {mib(c.estimate_bytes)} {mib(c.analytic_bytes)} "
                 f"{c.compiler_bytes / c.analytic_bytes:>20.2f} {us(c.compiler_seconds)} {us(c.roofline_seconds)}")
  return "\n".join(lines)


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
        compiled = compile_lowered(fn.lower(emb, emb, scalar, scalar), slice_)
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
  if FLAGS.check_cost_model:
    topology = FLAGS.topology or "v5e:2x2"
    print(format_cost_checks(check_cost_model(topology), topology))
    return
  if not FLAGS.topology or FLAGS.config is None:
    raise app.UsageError("--config and --topology are required, e.g. --config=configs/sycoca_base.py "
                         "--topology=v5e-64.")
  config = FLAGS.config
  if FLAGS.logits_path:
    print(format_logits_table(config, *compile_logits_path(config, FLAGS.topology)))
    return
  report = compile_for_slice(config, FLAGS.topology, breakdown=FLAGS.breakdown, hlo_out=FLAGS.hlo_out)
  print(format_table(report, FLAGS.headroom))
  print(format_peaks(report.slice.generation))
  if report.ops:
    print(format_breakdown(report.ops, report.bytes_accessed, report.compiled_flops))
  if not report.fits(FLAGS.headroom):
    print(fit_hints(report, config))
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
