"""Checkpoint integrity: checksums saved with each array, verified on restore, and the fall-back on resume."""

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import multihost_utils

from sycoca_jax import checkpoint, train
from sycoca_jax.models.sycoca import SyCoCa, default_model_config
from tests import distributed
from tests.helpers import copy_run
from tests.helpers import trained_run_config


def _flip_a_byte(workdir, step, offset=1000):
  """Damages a checkpoint as a bad disk would: one byte inside its largest array data file, file size kept."""
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state"))
           for f in names if os.path.basename(d) == "d"]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[offset] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _state(seed):
  rng = np.random.RandomState(seed)
  return {"params": {"dense": {"kernel": jnp.asarray(rng.randn(64, 64).astype(np.float32)),
                               "scale": jnp.ones((8,), jnp.bfloat16)}},
          "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.PRNGKey(seed)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_checksums_do_not_depend_on_sharding_and_see_one_changed_word():
  state = _state(0)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.device_put(state["params"]["dense"]["kernel"], jax.NamedSharding(mesh, jax.P("data")))
  assert checkpoint.checksums({"k": sharded}) == checkpoint.checksums({"k": np.asarray(sharded)})
  sums = checkpoint.checksums(state)
  assert sorted(sums) == ["params/dense/kernel", "params/dense/scale", "rng", "step"]
  kernel = np.asarray(state["params"]["dense"]["kernel"])
  changed = kernel.copy()
  changed[5, 7] = np.nextafter(changed[5, 7], np.float32(np.inf))  # the lowest bit of one word
  assert checkpoint.checksums({"k": changed})["k"] != checkpoint.checksums({"k": sharded})["k"]
  swapped = kernel[::-1]  # the same words in another order
  assert checkpoint.checksums({"k": swapped})["k"] != checkpoint.checksums({"k": sharded})["k"]


def test_flipped_bytes_fail_verification_naming_the_step(tmp_path):
  params = _state(0)["params"]
  checkpoint.save_params(tmp_path, params, ml_collections.ConfigDict({"x": 1}), step=3)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(tmp_path)[1], params)
  _flip_a_byte(tmp_path, 3)
  # orbax itself reads the damaged bytes back without complaint.
  with pytest.raises(checkpoint.CheckpointUnreadable,
                     match=r"^Checkpoint step 3 failed verification: params/dense/kernel does not match"):
    checkpoint.load_params(tmp_path)


def test_read_only_load_prints_no_read_only_notices(tmp_path, caplog):
  checkpoint.save_params(tmp_path, _state(0)["params"], ml_collections.ConfigDict({"x": 1}))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checkpoint.load_params(tmp_path)
  assert not [r.getMessage() for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]
  assert not logging.getLogger("absl").filters  # the filter lives only as long as the load
  with caplog.at_level(logging.WARNING):
    logging.getLogger("absl").warning("Given directory is read only=elsewhere")
  assert "Given directory is read only=elsewhere" in caplog.text


def test_restore_latest_falls_back_to_the_previous_good_checkpoint(tmp_path, caplog):
  checkpointer = checkpoint.Checkpointer(tmp_path, async_save=False)
  config = ml_collections.ConfigDict({"x": 1})
  for step in (1, 2):
    checkpointer.save(step, _state(step), {"position": step}, config)
  _flip_a_byte(tmp_path, 2)
  with caplog.at_level(logging.WARNING):
    step, state, data_state = checkpointer.restore_latest(_abstract(_state(0)))
  assert step == 1 and data_state == {"position": 1}
  jax.tree.map(np.testing.assert_array_equal, state, _state(1))
  assert ("Resumed from step 1 instead of step 2: Checkpoint step 2 failed verification: params/dense/kernel "
          "does not match") in caplog.text
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / "2") and checkpointer.manager.all_steps() == [1]
  checkpointer.save(2, _state(2), {"position": 2}, config)  # the step can be written again
  assert checkpointer.restore_latest(_abstract(_state(0)))[0] == 2
  checkpointer.close()


def test_restore_latest_raises_and_moves_nothing_when_no_checkpoint_verifies(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(1, _state(1), None, ml_collections.ConfigDict({"x": 1}))
  _flip_a_byte(tmp_path, 1)
  with pytest.raises(checkpoint.CheckpointUnreadable, match=r"^Checkpoint step 1 failed verification: .* No "
                                                             r"other checkpoint in the workdir can be restored"):
    checkpointer.restore_latest(_abstract(_state(0)))
  assert checkpointer.manager.all_steps() == [1] and not os.path.exists(tmp_path / "damaged_checkpoints")
  checkpointer.close()


@pytest.mark.slow(reason="resumes and trains the shared tiny run")
def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, trained_run, caplog):
  workdir = str(copy_run(trained_run, tmp_path / "w"))  # checkpoints at steps 1 and 2
  _flip_a_byte(workdir, 2)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(trained_run_config(), workdir)
  assert "Resumed from step 1 instead of step 2: Checkpoint step 2 failed verification" in caplog.text
  assert checkpoint.Checkpointer(workdir).manager.all_steps() == [1, 2]
  _, params, step = checkpoint.load_params(workdir)  # the new step 2 verifies
  assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def two_process_target():
  """Each process holds half of every array: save two steps, damage the newer one, resume from the older."""
  workdir = os.environ["SYCOCA_CHECKPOINT_TEST_DIR"]
  mesh = jax.make_mesh((2,), ("data",))
  split = jax.NamedSharding(mesh, jax.P("data"))
  host = jax.tree.map(np.asarray, {1: _state(1), 2: _state(2)})
  states = {step: jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, split if x.ndim else
                                                                      jax.NamedSharding(mesh, jax.P()),
                                                                      lambda index, x=x: x[index]), state)
            for step, state in host.items()}
  checkpointer = checkpoint.Checkpointer(workdir, async_save=False)
  for step, state in states.items():
    checkpointer.save(step, state, {"process": jax.process_index()}, ml_collections.ConfigDict({"x": 1}))
  if jax.process_index() == 0:
    _flip_a_byte(workdir, 2)
  multihost_utils.sync_global_devices("damaged")
  step, state, data_state = checkpointer.restore_latest(_abstract(states[1]))
  checkpointer.close()
  return {"step": step, "data_state": data_state, "checksums": checkpoint.checksums(state)}


@pytest.mark.slow(reason="two processes over loopback")
def test_two_processes_verify_and_fall_back_together(tmp_path, monkeypatch):
  monkeypatch.setenv("SYCOCA_CHECKPOINT_TEST_DIR", str(tmp_path / "w"))
  single, workers = distributed.run_on_processes("tests.test_checkpoint:two_process_target", tmp_path,
                                                 while_waiting=lambda: checkpoint.checksums(_state(1)))
  for i, result in enumerate(workers):
    assert result["step"] == 1 and result["data_state"] == {"process": i}
    assert result["checksums"] == single  # split over two hosts, the same sums as on one device
  assert os.listdir(tmp_path / "w" / "damaged_checkpoints") == ["2"]


def test_a_model_key_added_after_saving_takes_its_default(tmp_path):
  saved = default_model_config().to_dict()
  del saved["remat_policy"], saved["vision"]["pool"]   # keys this checkpoint's code did not have yet
  checkpoint.save_params(tmp_path, _state(0)["params"], ml_collections.ConfigDict({"model": saved}))
  config, _, _ = checkpoint.load_params(tmp_path)
  assert config.model.remat_policy == default_model_config().remat_policy
  assert config.model.vision.pool == default_model_config().vision.pool


def test_a_checkpoint_older_than_the_logit_bias_loads_it_at_its_default(tmp_path):
  params = {"logit_scale": jnp.float32(2.0), "dense": _state(0)["params"]["dense"]}
  checkpoint.save_params(tmp_path, params, ml_collections.ConfigDict({"model": default_model_config().to_dict()}))
  _, loaded, _ = checkpoint.load_params(tmp_path)
  assert float(loaded["logit_bias"]) == SyCoCa.init_logit_bias == -10.0
  assert float(loaded["logit_scale"]) == 2.0
