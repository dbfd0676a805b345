"""The AOT tool: the train step that training runs, compiled by the TPU compiler for a small slice on this machine."""

import importlib.util
import os
import subprocess
import sys

import pytest

from sycoca_jax.tools import aot
from tests.helpers import small_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")


@pytest.mark.parametrize("name,topology,chips", [
    ("v4-64", "v4:2x4x4", 32),        # v4 and v5p names count TensorCores, two per chip
    ("v5p-32", "v5p:2x2x4", 16),
    ("v5e-64", "v5e:8x8", 64),        # v5e and v6e names count chips
    ("v5litepod-16", "v5e:4x4", 16),
    ("v6e-256", "v6e:16x16", 256),
    ("v5e:2x4", "v5e:2x4", 8),
])
def test_slice_names(name, topology, chips):
  s = aot.parse_slice(name)
  assert (s.topology_name, s.chips) == (topology, chips)


def test_bad_slice_names_say_what_is_expected():
  with pytest.raises(ValueError, match="count TensorCores, 2 per chip"):
    aot.parse_slice("v4-7")
  with pytest.raises(ValueError, match="expected e.g. v4-64"):
    aot.parse_slice("v3-8")


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
  report = aot.compile_for_slice(config, "v5e:2x2")
  assert (report.slice.chips, report.hosts, report.mesh) == (4, 1, {"data": 4, "fsdp": 1})
  assert report.device_kind == "TPU v5 lite"
  # float32 parameters and two AdamW moments, replicated (fsdp = 1), plus a few scalars.
  assert report.state_bytes == pytest.approx(3 * 4 * report.params, rel=0.01)
  assert report.state_bytes < report.total_bytes < 0.1 * report.slice.chip.hbm_gib * aot.GIB
  assert report.fits(15.0)
  table = aot.format_table(report, headroom=15.0, mfu=40.0)
  assert "4 x TPU v5 lite (v5e), 1 host" in table and "FITS with" in table


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
