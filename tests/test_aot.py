"""The AOT tool: the train step that training runs, compiled by the TPU compiler for a small slice (and by XLA:GPU for
a few GPUs) on this machine."""

import importlib.util
import os
import re
import subprocess
import sys
import types

import pytest

from sycoca_jax.tools import aot
from tests.helpers import small_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="jax's CUDA plugin is not installed (pip install -e '.[gpu_aot]'): no GPU compiler here")


@pytest.mark.parametrize("name,topology,chips", [
    ("v4-64", "v4:2x4x4", 32),        # v4 and v5p names count TensorCores, two per chip
    ("v5p-32", "v5p:2x2x4", 16),
    ("v5e-64", "v5e:8x8", 64),        # v5e and v6e names count chips
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-256", "v6e:16x16", 256),
    ("v5e:2x4", "v5e:2x4", 8),
    ("h100-8", "h100:1x8", 8),        # GPUs: hosts x GPUs per host, 8 to a host
    ("h100-4", "h100:1x4", 4),
    ("h200-16", "h200:2x8", 16),
    ("h100:2x4", "h100:2x4", 8),
])
def test_slice_names(name, topology, chips):
  s = aot.parse_slice(name)
  assert (s.topology_name, s.chips) == (topology, chips)


def test_bad_slice_names_say_what_is_expected():
  with pytest.raises(ValueError, match="count TensorCores, 2 per chip"):
    aot.parse_slice("v4-7")
  with pytest.raises(ValueError, match="expected e.g. v4-64"):
    aot.parse_slice("v3-8")
  with pytest.raises(ValueError, match="h100:HOSTSxGPUS"):
    aot.parse_slice("h100-12")


def test_fit_hints_offer_gradient_accumulation_only_where_the_config_takes_it():
  report = types.SimpleNamespace(mesh={"fsdp": 1}, global_batch=64, slice=types.SimpleNamespace(chips=4),
                                 state_bytes=0, total_bytes=1, temp_bytes=0, error=None)
  config = small_train_config()
  assert "--config.grad_accum_steps=2" in aot.fit_hints(report, config)
  config.loss.update(token_weight=1.0, token_loss="filip")   # each caption against the whole batch's images
  assert "--config.grad_accum_steps" not in aot.fit_hints(report, config)


def test_chip_peaks_are_the_published_figures():
  assert {g: (c.peak_bf16_tflops, c.hbm_gbps) for g, c in aot.CHIPS.items()} == {
      "v4": (275, 1228), "v5e": (197, 819), "v5p": (459, 2765), "v6e": (918, 1640), "h100": (989, 3350),
      "h200": (989, 4800)}
  assert aot.CHIPS["v5e"].ridge == pytest.approx(240.5, abs=0.1)   # 197e12 / 819e9 FLOP per byte
  assert aot.CHIPS["v6e"].ridge == pytest.approx(559.8, abs=0.1)
  table = aot.format_peaks("v6e")
  assert aot.CHIPS["h100"].ridge == pytest.approx(295.2, abs=0.1)
  assert "* v6e            918     1,640              560" in table and "  v5e            197       819              241" in table


def test_roofline_of_a_memory_bound_and_a_compute_bound_step():
  # 13.8 TFLOP and 151 GiB per v5e chip: 70.1 ms at 197 TFLOP/s, 198.0 ms at 819 GB/s.
  roof = aot.Roofline(flops=13.8e12, hbm_bytes=151 * aot.GIB, chip=aot.CHIPS["v5e"])
  assert roof.compute_seconds == pytest.approx(0.070051, rel=1e-4)
  assert roof.memory_seconds == pytest.approx(0.197967, rel=1e-4)
  assert roof.bound == "memory" and roof.step_seconds == roof.memory_seconds
  assert roof.mfu_ceiling == pytest.approx(0.35385, rel=1e-4)
  assert roof.intensity == pytest.approx(85.11, rel=1e-3)
  # 55 TFLOP and 100 GiB per v5p chip: 119.8 ms of compute, 38.8 ms of traffic.
  roof = aot.Roofline(flops=55e12, hbm_bytes=100 * aot.GIB, chip=aot.CHIPS["v5p"])
  assert roof.bound == "compute" and roof.mfu_ceiling == 1.0
  assert roof.step_seconds == pytest.approx(0.119826, rel=1e-4)
  assert roof.memory_seconds == pytest.approx(0.038834, rel=1e-4)


def _report(**overrides):
  """A Report as compile_for_slice fills it, for v5e-64 (figures of the README's sycoca_base row)."""
  fields = dict(slice=aot.parse_slice("v5e-64"), device_kind="TPU v5 lite", hosts=16, mesh={"data": 1, "fsdp": 64},
                global_batch=2048, accum=1, model="bfloat16 compute", params=471_500_000, state_bytes=0.09 * aot.GIB,
                batch_bytes=0.01 * aot.GIB, temp_bytes=8 * aot.GIB, total_bytes=8.44 * aot.GIB,
                flops_per_step=64 * 13.8e12, bytes_accessed=151 * aot.GIB, scanned=False, num_steps=106_445,
                compile_s=530.0, compiled_flops=13.9e12)
  fields.update(overrides)
  return aot.Report(**fields)


def test_the_table_prints_the_roofline_per_chip():
  report = _report()
  # The step's FLOPs are the whole slice's; the roofline takes each chip's share.
  assert report.roofline.flops == pytest.approx(13.8e12)
  table = aot.format_table(report, headroom=15.0)
  for row in ("883.20 TFLOP on the slice, 13.80 TFLOP per chip (0.43 TFLOP per example)",
              "the TPU compiler counts 13.90 TFLOP per chip", "151.00 GiB per step", "85 FLOP per byte",
              "ridge point: 241", "70.1 ms (FLOPs per chip / 197 TFLOP/s", "198.0 ms (HBM bytes per chip / 819 GB/s)",
              "35.4 %", "198.0 ms, the memory time", "5.85 h"):   # 106,445 x 0.198 s
    assert row in table, row
  assert re.search(r"^bound +memory$", table, re.M)


def test_no_roofline_without_a_true_traffic_count():
  assert _report(scanned=True).roofline is None
  assert "a scanned layer's traffic is counted once" in aot.format_table(_report(scanned=True), headroom=15.0)
  refused = _report(error="RESOURCE_EXHAUSTED: ...", bytes_accessed=0.0)
  assert refused.roofline is None and "roofline" in aot.format_table(refused, headroom=15.0)


# A compiled program's text, as the TPU compiler prints it (tiled layouts, operands by name), cut down: an all-gather
# of a weight, a matmul fusion in a loop of 3 trips, an optimizer fusion.
HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation (param_0: bf16[64,128], param_1: bf16[128,256]) -> bf16[64,256] {
  %param_0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.1 = bf16[64,256]{1,0:T(8,128)(2,1)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

%body (p: (s32[], bf16[64,128], bf16[128,256])) -> (s32[], bf16[64,128], bf16[128,256]) {
  %p = (s32[], bf16[64,128]{1,0}, bf16[128,256]{1,0}) parameter(0)
  %x = bf16[64,128]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %w = bf16[128,256]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %fusion.2 = bf16[64,256]{1,0:T(8,128)(2,1)} fusion(%x, %w), kind=kOutput, calls=%fused_computation, \
metadata={op_name="jit(train_step)/jit(main)/SyCoCa/image_encoder/transformer/layers_0/self/mlp/c_fc/dot_general"}
  ROOT %t = (s32[], bf16[64,128]{1,0}, bf16[128,256]{1,0}) tuple(%p)
}

%cond (p.1: (s32[], bf16[64,128], bf16[128,256])) -> pred[] {
  %p.1 = (s32[], bf16[64,128]{1,0}, bf16[128,256]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%fused_computation.3 (param_0.3: f32[1000], param_1.3: f32[1000]) -> f32[1000] {
  %param_0.3 = f32[1000]{0:T(1024)} parameter(0)
  %param_1.3 = f32[1000]{0:T(1024)} parameter(1)
  ROOT %add.3 = f32[1000]{0:T(1024)} add(%param_0.3, %param_1.3)
}

ENTRY %main.9 (Arg_0.1: bf16[64,128], Arg_1.2: bf16[16,256], Arg_2.3: f32[1000], Arg_3.4: f32[1000]) -> f32[1000] {
  %Arg_0.1 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %Arg_1.2 = bf16[16,256]{1,0:T(8,128)(2,1)} parameter(1)
  %Arg_2.3 = f32[1000]{0:T(1024)} parameter(2)
  %Arg_3.4 = f32[1000]{0:T(1024)} parameter(3)
  %all-gather-start = (bf16[16,256]{1,0:T(8,128)(2,1)}, bf16[128,256]{1,0:T(8,128)(2,1)}) all-gather-start(%Arg_1.2), \
dimensions={0}, metadata={op_name="jit(train_step)/jit(main)/SyCoCa/image_encoder/transformer/layers_0/self/mlp/c_fc/all_gather"}
  %all-gather-done = bf16[128,256]{1,0:T(8,128)(2,1)} all-gather-done(%all-gather-start)
  %tuple = (s32[], bf16[64,128]{1,0}, bf16[128,256]{1,0}) tuple(%Arg_0.1, %all-gather-done)
  %while = (s32[], bf16[64,128]{1,0}, bf16[128,256]{1,0}) while(%tuple), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %fusion.4 = f32[1000]{0:T(1024)} fusion(%Arg_2.3, %Arg_3.4), kind=kLoop, calls=%fused_computation.3, \
metadata={op_name="jit(train_step)/jit(main)/optimizer/add" source_file="train.py" source_line=260}
}
"""  # (a backslash ends a line that the compiler prints as one)


def test_hlo_costs_count_operands_and_results_once_per_trip():
  ops = {o.name: o for o in aot.hlo_costs(HLO)}
  assert set(ops) == {"all-gather-start", "fusion.2", "fusion.4"}
  # Each of 3 trips reads [64, 128] and [128, 256] bf16 and writes [64, 256]: 2 x 64 x 128 x 256 FLOPs.
  assert ops["fusion.2"].bytes == 3 * 2 * (64 * 128 + 128 * 256 + 64 * 256)
  assert ops["fusion.2"].flops == 3 * 2 * 64 * 128 * 256
  assert (ops["fusion.2"].opcode, ops["fusion.2"].shape, ops["fusion.2"].part) == (
      "fusion kOutput", "bf16[64,256]", "MLPs")
  # The gather reads its shard and writes the whole weight.
  assert ops["all-gather-start"].bytes == 2 * (16 * 256 + 128 * 256)
  assert ops["all-gather-start"].part == "FSDP gathers / collectives"
  assert (ops["fusion.4"].bytes, ops["fusion.4"].flops, ops["fusion.4"].part) == (3 * 4000, 0, "optimizer update")
  table = aot.format_breakdown(list(ops.values()), compiled_bytes=2 ** 20, compiled_flops=1e6)
  assert re.search(r"^MLPs +0\.00 +\d+\.\d +0\.000 +100\.0 ", table, re.M)


# What the memory-space assignment leaves in a TPU program: a prefetch of a weight into on-chip memory (S(1)), an
# asynchronous slice of the batch into it, a fusion reading the prefetched copy, a concatenation by renaming.
HLO_ON_CHIP = """HloModule jit_train_step, is_scheduled=true

%fused_computation (param_0: bf16[64,128], param_1: bf16[128,256]) -> bf16[64,256] {
  %param_0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[128,256]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %convolution.1 = bf16[64,256]{1,0:T(8,128)(2,1)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

ENTRY %main.2 (Arg_0.1: bf16[64,128], Arg_1.2: bf16[128,256], Arg_2.3: u8[32,16]) -> bf16[64,256] {
  %Arg_0.1 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %Arg_1.2 = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(1)
  %Arg_2.3 = u8[32,16]{1,0} parameter(2)
  %copy-start = (bf16[128,256]{1,0:T(8,128)(2,1)S(1)}, bf16[128,256]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%Arg_1.2)
  %copy-done = bf16[128,256]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %slice-start = ((u8[32,16]{1,0}), u8[8,16]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%Arg_2.3), slice={[0:8], [0:16]}
  %slice-done = u8[8,16]{1,0:S(1)} slice-done(%slice-start)
  %custom-call = bf16[64,128]{1,0} custom-call(%Arg_0.1), custom_call_target="ConcatBitcast"
  ROOT %fusion = bf16[64,256]{1,0:T(8,128)(2,1)} fusion(%custom-call, %copy-done), kind=kOutput, \
calls=%fused_computation, metadata={op_name="jit(train_step)/jit(main)/SyCoCa/image_encoder/mlp/c_fc/dot_general"}
}
"""


def test_hlo_costs_count_hbm_only():
  """Buffers the memory-space assignment put on chip cost no HBM traffic: a prefetch reads its HBM source once, an
  asynchronous slice reads its slice, a fusion reads only its operands in HBM, a ConcatBitcast moves nothing."""
  ops = {o.name: o for o in aot.hlo_costs(HLO_ON_CHIP)}
  assert set(ops) == {"copy-start", "slice-start", "fusion"}
  assert ops["copy-start"].bytes == 2 * 128 * 256
  assert ops["copy-start"].part == "prefetches / spills (on-chip memory)"
  assert ops["slice-start"].bytes == 8 * 16 + 4   # the slice, and the done-flag the tuple carries
  assert ops["fusion"].bytes == 2 * (64 * 128 + 64 * 256)   # the weight is read from on-chip memory
  assert ops["fusion"].part == "MLPs"


def test_attention_matmuls_written_as_dilated_convolutions_count_their_flops():
  """The TPU compiler writes q @ k^T over [B, H] as a convolution with the batch dimensions spatial (window =
  input dilation): each logit sums over the head width only."""
  shapes = {"q": "f32[32,12,77,64]{3,2,1,0}", "k": "f32[32,12,77,64]{3,2,1,0}"}
  inst = aot._Instruction("c", "f32[32,12,77,77]{2,3,1,0}", "convolution", ["q", "k"],
                          "window={size=32x12 stride=31x11 lhs_dilate=32x12}, dim_labels=01bf_01oi->01bf")
  assert aot._dot_flops(inst, shapes) == 2 * 32 * 12 * 77 * 77 * 64


@pytest.mark.parametrize("op_name,part", [
    ("jit(train_step)/jit(main)/transpose(jvp(SyCoCa))/text_encoder/transformer/layers_1/self/attn/query/dot_general",
     "attention"),
    ("jit(train_step)/jit(main)/jvp(SyCoCa)/image_encoder/transformer/layers_0/self/ln_2/reduce_sum", "layer norms"),
    ("jit(train_step)/jit(main)/jvp(SyCoCa)/image_decoder/transformer/layers_0/self/mlp/c_fc/dot_general",
     "TG-MIM decoder"),
    ("jit(train_step)/jit(main)/jvp(SyCoCa)/text_decoder/dot_general", "vocabulary logits + caption loss"),
    ("jit(train_step)/jit(main)/transpose(jvp(caption_loss))/reduce_max", "vocabulary logits + caption loss"),
    ("jit(train_step)/jit(main)/optimizer/mul", "optimizer update"),
    ("jit(train_step)/jit(main)/jvp(SyCoCa)/SyCoCa.encode_image/image_encoder/conv_stem/conv1/conv_general_dilated",
     "patch embedding / stem"),
    ("jit(train_step)/jit(main)/jvp(SyCoCa)/SyCoCa.encode_image/image_encoder/conv1/dot_general",
     "patch embedding / stem"),
])
def test_ops_are_mapped_to_the_model_parts_by_their_name_stack(op_name, part):
  assert aot.OpCost("x", "fusion kLoop", "f32[1]", op_name, 1.0, 0.0).part == part


@needs_libtpu
def test_v4_slices_have_one_device_per_chip():
  devices = aot.topology_devices(aot.parse_slice("v4-64"))
  assert len(devices) == 32 and len({d.process_index for d in devices}) == 8


@pytest.mark.slow(reason="compiles the train step three times (scanned, unrolled, rematerialised)")
def test_flop_count_unrolls_scanned_layers_and_includes_remat():
  config = small_train_config()
  plain = aot.count_flops(config)
  config.model.scan_layers = True
  assert aot.count_flops(config) == pytest.approx(plain, rel=1e-6)
  config.model.remat = True
  full = aot.count_flops(config)
  config.model.remat_policy = "dots"  # keeps the matmul outputs: recomputes much less than 'full'
  assert plain < aot.count_flops(config) < full and full > 1.1 * plain


@pytest.mark.slow(reason="compiles the train step for a TPU slice with libtpu")
@needs_libtpu
def test_train_step_compiles_for_a_v5e_slice_and_fits():
  config = small_train_config()  # sycoca_tiny:runlocal, batch 16
  report = aot.compile_for_slice(config, "v5e:2x2", breakdown=True)
  assert (report.slice.chips, report.hosts, report.mesh) == (4, 1, {"data": 4, "fsdp": 1})
  assert report.device_kind == "TPU v5 lite"
  # float32 parameters and two AdamW moments, replicated (fsdp = 1), plus a few scalars.
  assert report.state_bytes == pytest.approx(3 * 4 * report.params, rel=0.01)
  assert report.state_bytes < report.total_bytes < 0.1 * report.slice.chip.hbm_gib * aot.GIB
  assert report.fits(15.0)
  table = aot.format_table(report, headroom=15.0)
  assert "4 x TPU v5 lite (v5e), 1 host" in table and "FITS with" in table
  # The roofline takes each chip's quarter of the step's FLOPs and the compiled program's traffic, every replica
  # reading at least its state (parameters, moments, gradients) once.
  roof = report.roofline
  assert roof.flops == pytest.approx(report.flops_per_step / 4) and roof.hbm_bytes > report.state_bytes
  assert f"{100 * roof.mfu_ceiling:.1f} %" in table and re.search(rf"^bound +{roof.bound}$", table, re.M)
  # The breakdown: every part of the model is found in the compiled step.
  parts = {o.part for o in report.ops}
  assert {"attention", "layer norms", "MLPs", "TG-MIM decoder", "vocabulary logits + caption loss",
          "optimizer update", "masking gathers"} <= parts, parts
  assert "Top 15 ops by bytes" in aot.format_breakdown(report.ops, report.bytes_accessed, report.compiled_flops)


@needs_libtpu
@pytest.mark.slow(reason="compiles the train step for a TPU slice in a subprocess")
def test_a_batch_too_large_for_the_slice_fails_and_says_what_to_change():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "sycoca_jax.tools.aot", "--config=configs/sycoca_tiny.py:runlocal",
       "--config.global_batch_size=262144", "--topology=v5e:2x2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout
  assert "--config.model.remat=True" in proc.stdout and "--config.grad_accum_steps=2" in proc.stdout


@needs_libtpu
def test_logits_path_alone_for_a_v5e_slice():
  """Only the contrastive loss, compiled by the TPU compiler: the ring's logits are one [b, b] block per chip, the
  sharded softmax's its [b, B] rows."""
  config = small_train_config(global_batch_size=512)
  slice_, mesh, reports = aot.compile_logits_path(config, "v5e:2x2")
  assert mesh == {"data": 4, "fsdp": 1}
  by = {(r.contrastive, r.impl): r for r in reports}
  assert set(by) == {(c, i) for c in ("softmax", "sigmoid") for i in ("sharded", "dense")}
  assert by["sigmoid", "sharded"].largest_logits == "128x128"
  assert by["softmax", "sharded"].largest_logits == "128x512"
  assert all(0 < r.total_bytes < 0.01 * slice_.chip.hbm_gib * aot.GIB and not r.error for r in reports)
  table = aot.format_logits_table(config, slice_, mesh, reports)
  assert "sigmoid  sharded" in table and "batch 512" in table


@needs_cuda_plugin
@pytest.mark.slow(reason="compiles the train step for four GPUs with XLA:GPU")
def test_train_step_compiles_for_gpus_without_a_gpu():
  config = small_train_config()  # sycoca_tiny:runlocal, batch 16
  report = aot.compile_for_slice(config, "h100:1x4")
  assert (report.slice.chips, report.hosts, report.mesh) == (4, 1, {"data": 4, "fsdp": 1})
  assert report.device_kind == "NVIDIA H100 80GB HBM3"
  # The GPU program's buffer plan: float32 parameters and two AdamW moments, replicated, plus a few scalars.
  assert report.state_bytes == pytest.approx(3 * 4 * report.params, rel=0.01)
  assert report.state_bytes < report.total_bytes < 0.01 * report.slice.chip.hbm_gib * aot.GIB
  # XLA's count of the GPU program, matmuls (cuBLAS calls) included: every replica reads at least its parameters
  # and moments and writes them back.
  assert report.library_calls > 0 and report.bytes_accessed > 2 * report.state_bytes
  roof = report.roofline
  assert roof.flops == pytest.approx(report.flops_per_step / 4) and roof.hbm_bytes == report.bytes_accessed
  table = aot.format_table(report, headroom=15.0)
  assert "4 x NVIDIA H100 80GB HBM3 (h100), 1 host" in table and "FITS with" in table
  assert f"{100 * roof.mfu_ceiling:.1f} %" in table and "(h100 ridge point: 295)" in table


@needs_cuda_plugin
def test_gpu_byte_count_of_a_matmul_is_its_operands_and_result():
  """A cuBLAS call is opaque to XLA's cost analysis; its bytes are put back without its scratch workspace."""
  check = aot.check_cost_model("h100-1")[0]
  assert check.program.startswith("bf16 matmul")
  assert check.compiler_bytes == pytest.approx(check.analytic_bytes, rel=1e-6)
  assert check.estimate_bytes == pytest.approx(check.analytic_bytes, rel=1e-6)
