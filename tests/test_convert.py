"""The open_clip importer without torch installed."""

import sys

import pytest

from sycoca_jax.convert import open_clip as convert_lib


def test_pickled_checkpoint_without_torch_gives_the_install_command(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  path = tmp_path / "open_clip_pytorch_model.bin"
  path.write_bytes(b"")
  with pytest.raises(ModuleNotFoundError, match=r"needs torch: pip install torch.*\.safetensors"):
    convert_lib.load_state_dict(str(path))
