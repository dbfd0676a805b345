"""show_masks: the five-panel grid for a tiny trained checkpoint, the IC-only grid for an imported open_clip one."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import get_tokenizer
from sycoca_jax.models.sycoca import build_model
from sycoca_jax.tools import show_masks
from tests import distributed
from tests.helpers import ROOT
from tests.helpers import random_params
from tests.helpers import tiny_model_config

CAPTIONS = ["a red circle", "two blue stars left of a green square"]


@pytest.fixture
def trained(trained_run):
  """A sycoca_tiny:runlocal checkpoint (32 px, patch 8: 16 patches) after two steps, only read here."""
  return str(trained_run)


def _scene(viewer):
  image, captions = show_masks.scene_image("scenes:test:3", viewer.config, viewer.image_size)
  assert image.shape == (32, 32, 3) and captions
  return image


@pytest.mark.slow(reason="reads the shared tiny trained run")
def test_trained_checkpoint_shows_all_five_panels(trained):
  viewer = show_masks.MaskViewer.load(trained)
  assert viewer.step == 2 and viewer.has_image_decoder
  masked = viewer.masks(_scene(viewer), CAPTIONS)
  assert masked.scores.shape == (2, 16) and masked.image.shape == (32, 32, 3)
  # 50 / 50: IC keeps the 8 best-scoring patches, TG-MIM sees exactly the other 8.
  assert (masked.ic_keep.sum(1) == 8).all()
  for row in range(2):
    best = np.argsort(-masked.scores[row], kind="stable")[:8]
    assert set(np.flatnonzero(masked.ic_keep[row])) == set(best)
  np.testing.assert_array_equal(masked.mim_visible, ~masked.ic_keep)
  # The reconstruction keeps the visible patches' pixels and fills the hidden ones.
  visible = show_masks.upsample(masked.mim_visible[0].astype(np.float32), 8) > 0.5
  np.testing.assert_allclose(masked.reconstruction[0][visible], masked.image[visible], atol=1e-5)
  assert list(show_masks.panels(masked, 1)) == list(show_masks.COLUMNS)

  random = viewer.masks(_scene(viewer), CAPTIONS, strategy="random", ic_ratio=0.25, mim_ratio=0.75)
  assert (random.ic_keep.sum(1) == 12).all() and (random.mim_visible.sum(1) == 4).all()


@pytest.mark.slow(reason="the show_masks command line in a subprocess, on the shared tiny trained run")
def test_command_line_writes_the_grid(trained, tmp_path):
  image_path, out = tmp_path / "scene.png", tmp_path / "masks.png"
  Image.new("RGB", (40, 30), (200, 30, 30)).save(image_path)  # any size: resized and centre-cropped
  env = distributed.child_env(JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "sycoca_jax.tools.show_masks", f"--workdir={trained}", f"--image={image_path}",
       *[f"--caption={c}" for c in CAPTIONS], f"--out={out}", "--panel_size=64"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 caption(s) x 5 panels" in proc.stdout
  grid = Image.open(out)
  assert grid.width > 5 * 64 and grid.height > 2 * 64


def test_attention_pooled_model_says_to_use_random_masking():
  tokenizer = get_tokenizer("scenes_words", max_len=12)
  cfg = tiny_model_config(**{"vision.pool": "attn", "vision.attn_pooler_queries": 5, "masking.strategy": "random",
                             "text.vocab_size": tokenizer.vocab_size})
  viewer = show_masks.MaskViewer(cfg, random_params(build_model(cfg)), tokenizer, has_image_decoder=False)
  image = np.zeros((32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="pools with attention.*--strategy=random"):
    viewer.masks(image, CAPTIONS)
  masked = viewer.masks(image, CAPTIONS, strategy="random")
  assert masked.mim_visible is None and (masked.ic_keep.sum(1) == 8).all()


def test_imported_open_clip_checkpoint_shows_the_ic_set_only(tmp_path):
  torch = pytest.importorskip("torch", reason="needs torch (pip install 'sycoca_jax[torch]')")
  open_clip = pytest.importorskip("open_clip", reason="needs open-clip-torch (pip install 'sycoca_jax[torch]')")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  from sycoca_jax.convert import open_clip as convert_lib  # pylint: disable=g-import-not-at-top

  # coca_base's layout (per-patch tokens, CLIP BPE), shrunk: 32 px, patch 8, two layers of width 32.
  geometry = {
      "embed_dim": 24, "quick_gelu": True, "custom_text": True,
      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                     "output_tokens": True},
      "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                   "embed_cls": True, "output_tokens": True},
      "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
  }
  config_path = tmp_path / "tiny_coca_show_masks.json"
  config_path.write_text(json.dumps(geometry))
  open_clip.add_model_config(str(config_path))
  torch.manual_seed(0)
  oc_model = open_clip.create_model(config_path.stem, pretrained=None).eval()
  weights = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()}, str(weights))
  cfg, params = convert_lib.convert(str(config_path), str(weights),
                                    overrides={"image_decoder.width": 16, "image_decoder.depth": 1,
                                               "image_decoder.heads": 2})
  workdir = tmp_path / "imported"
  convert_lib.save(str(workdir), params, cfg, geometry)

  viewer = show_masks.MaskViewer.load(str(workdir))
  assert viewer.step == 0 and not viewer.has_image_decoder  # CoCa has no image decoder: it is freshly made
  masked = viewer.masks(np.full((48, 64, 3), 128, np.uint8), CAPTIONS)
  assert masked.mim_visible is None and masked.reconstruction is None
  assert (masked.ic_keep.sum(1) == 8).all()
  assert list(show_masks.panels(masked, 0)) == ["input", "patch scores", "IC set"]
  grid = show_masks.render(masked, panel_size=64)
  assert grid.width < 4 * 64 + 5 * 8  # three panels and their gaps
