r"""Pictures of what the caption makes the model look at: patch scores, the IC set, the TG-MIM set and rebuild.

  python -m sycoca_jax.tools.show_masks --workdir=/tmp/sycoca_tiny --image=photo.png \
      --caption="a red circle" --caption="a blue star left of a green 7" --out=masks.png
  python -m sycoca_jax.tools.show_masks --workdir=/tmp/sycoca_tiny --image=scenes:test:7 --out=masks.png

writes one PNG with a row per caption:

  input | patch scores | IC set | TG-MIM visible | TG-MIM reconstruction

* input: the image as the model sees it (resized on its shorter side and centre-cropped to the model's size).
* patch scores: the ranking the masking strategy uses, as a heat map over the input (for `attentive`,
  s_i = max_j cos(patch_i, token_j) over the caption's tokens; yellow = most text-relevant).
* IC set: the patches the captioner attends to (the others dimmed).
* TG-MIM visible: the patches the image decoder is given; it must rebuild the dimmed ones from them and the
  caption.
* TG-MIM reconstruction: the visible patches with the decoder's prediction pasted into the hidden ones.

The sets come from the model's own masking code (`SyCoCa.choose_masks`, the call training makes) on a copy of
the model with the chosen strategy and ratios: a checkpoint of any ablation row can be asked what attentive
masking would pick from its features. The last two columns need a trained image decoder, which a checkpoint has
when it was trained with a TG-MIM loss (step > 0 and loss.mim_weight > 0). An imported open_clip CoCa checkpoint
has none (its TG-MIM head is freshly initialised): its rows show the scores and the IC set only. Models whose
image tower pools with attention (open_clip's coca_ViT-*) have no per-patch embeddings to score: use
--strategy=random there, or a model with model.vision.pool='tok' (e.g. coca_base).

--image takes a file (local or gs://) or `scenes:SPLIT:INDEX`, a scene of the built-in data drawn at the model's
image size; without --caption such a scene is shown with its own captions.

From Python (notebooks):
    viewer = show_masks.MaskViewer.load("/tmp/sycoca_tiny")
    result = viewer.masks(image, ["a red circle", "a blue star"])   # numpy arrays, see `Masked`
    show_masks.render(result).save("masks.png")                     # the same grid as a PIL image
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw, ImageFont

from sycoca_jax import inference, pixels
from sycoca_jax.models.sycoca import SyCoCa
from sycoca_jax.models.vit import patchify, unpatchify

FLAGS = flags.FLAGS

STRATEGIES = ("attentive", "random")
COLUMNS = ("input", "patch scores", "IC set", "TG-MIM visible", "TG-MIM reconstruction")


def define_flags():
  """The command line, defined when the tool runs (not on import: several tools in one process, e.g. a test
  session, would define the same flag twice)."""
  flags.DEFINE_string("workdir", None, "Training workdir or imported checkpoint (a folder or gs:// URL).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("image", None, "Image file (local or gs://), or scenes:SPLIT:INDEX for a built-in scene.")
  flags.DEFINE_multi_string("caption", [], "A caption to score the patches with (repeat for more rows).")
  flags.DEFINE_string("out", "masks.png", "Where the PNG goes.")
  flags.DEFINE_enum("strategy", "attentive", list(STRATEGIES), "Masking strategy to show.")
  flags.DEFINE_float("ic_ratio", 0.0, "Share of patches IC drops (0: the checkpoint's, else 0.5).")
  flags.DEFINE_float("mim_ratio", 0.0, "Share of patches TG-MIM hides (0: the checkpoint's, else the IC ratio).")
  flags.DEFINE_integer("seed", 0, "Seed of the random strategy.")
  flags.DEFINE_integer("panel_size", 192, "Approximate width of one panel in pixels (patches stay sharp).")
  flags.mark_flags_as_required(["workdir", "image"])


# ------------------------------------------------------------------------------------------------------------------
# The masks.
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Masked:
  """One image and C captions (N patches of p x p pixels in an S x S image, float arrays in [0, 1]).

  image           [S, S, 3]     the input as the model sees it
  scores          [C, N]        the ranking the strategy used (float32)
  ic_keep         [C, N] bool   True where the captioner attends
  mim_visible     [C, N] bool   True where TG-MIM sees the patch (None: the model has no trained image decoder)
  reconstruction  [C, S, S, 3]  visible patches plus the decoder's prediction in the hidden ones (or None)
  """

  image: np.ndarray
  captions: list[str]
  scores: np.ndarray
  ic_keep: np.ndarray
  mim_visible: Optional[np.ndarray]
  reconstruction: Optional[np.ndarray]
  patch_size: int
  strategy: str
  ic_ratio: float
  mim_ratio: float


def _indicator(ids: jax.Array, num_patches: int) -> jax.Array:
  """Patch index sets [B, K] -> bool [B, N]."""
  return jnp.zeros((ids.shape[0], num_patches), bool).at[jnp.arange(ids.shape[0])[:, None], ids].set(True)


def _masks(module: SyCoCa, images, texts, rng, *, reconstruct: bool, norm_pix: bool):
  """The sets (and the TG-MIM prediction) training would choose for images [B, S, S, 3], texts [B, L]."""
  if reconstruct:
    out = module(images, texts, rng=rng, heads=("mim",))
    masks = out["masks"]
  else:
    masks = module.choose_masks(rng, module.encode_image(images), module.encode_text(texts), texts)
  num_patches = masks.scores.shape[1]
  result = {"scores": masks.scores, "ic_keep": _indicator(masks.ic_keep, num_patches)}
  if reconstruct:
    p = module.image_encoder.patch_size
    patches = patchify(pixels.normalize(images).astype(jnp.float32), p)
    pred = out["mim_pred"].astype(jnp.float32)
    if norm_pix:  # the targets were normalised per patch (losses.mim_targets): undo it with the input's stats
      pred = pred * jnp.sqrt(patches.var(-1, keepdims=True) + 1e-6) + patches.mean(-1, keepdims=True)
    hidden = masks.mim_mask[..., None]
    result["mim_visible"] = masks.mim_mask < 0.5
    result["reconstruction"] = unpatchify(patches * (1 - hidden) + pred * hidden, p)
  return result


class MaskViewer:
  """A model and its weights, asked which patches each caption selects (module docstring)."""

  def __init__(self, model_config: ml_collections.ConfigDict, params: Any, tokenizer, *,
               has_image_decoder: bool, norm_pix: bool = True):
    self.inference = inference.Inference(model_config, params, tokenizer, batch_size=1)
    self.model, self.params, self.tokenizer = self.inference.model, params, tokenizer
    self.has_image_decoder, self.norm_pix = has_image_decoder, norm_pix
    self.config: Optional[ml_collections.ConfigDict] = None  # the run config and step, when loaded from a workdir
    self.step: Optional[int] = None
    self._fns: dict = {}

  @classmethod
  def load(cls, workdir: str, step: Optional[int] = None) -> "MaskViewer":
    """The latest (or `step`) checkpoint of a training workdir or of an imported open_clip model."""
    from sycoca_jax import checkpoint  # pylint: disable=g-import-not-at-top
    from sycoca_jax import losses  # pylint: disable=g-import-not-at-top
    from sycoca_jax.data import tokenizer_from_config  # pylint: disable=g-import-not-at-top

    config, params, step = checkpoint.load_params(workdir, step)
    # Step 0 is an import (or untrained weights): the image decoder was never fit. A run without a TG-MIM loss
    # did not train it either.
    trained_decoder = step > 0 and "mim" in losses.enabled_heads(config.loss)
    viewer = cls(config.model, params, tokenizer_from_config(config.data), has_image_decoder=trained_decoder,
                 norm_pix=bool(config.loss.get("norm_pix", True)))
    viewer.config, viewer.step = config, step
    return viewer

  @property
  def image_size(self) -> int:
    return self.inference.image_size

  def ratios(self, ic_ratio: float = 0.0, mim_ratio: float = 0.0) -> tuple[float, float]:
    """(IC ratio, TG-MIM ratio): the given ones, else the model's, else 0.5 and the IC ratio (CLIP / CoCa)."""
    ic = ic_ratio or self.model.ic_ratio or 0.5
    mim = mim_ratio or self.model.mim_ratio or ic
    for key, r in (("ic_ratio", ic), ("mim_ratio", mim)):
      if not 0.0 < r < 1.0:
        raise ValueError(f"{key}={r}: must be in (0, 1).")
    return float(ic), float(mim)

  def masks(self, image: Any, captions: Sequence[str], *, strategy: str = "attentive", ic_ratio: float = 0.0,
            mim_ratio: float = 0.0, seed: int = 0, preprocessed: bool = False) -> Masked:
    """The sets `strategy` picks in `image` (one PIL image, path or array; see sycoca_jax.inference) per caption.

    preprocessed=True: `image` is already [S, S, 3] (e.g. a row of a sycoca_jax.data batch: uint8 pixels, or
    floats normalised already).
    """
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}.")
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions:
      raise ValueError("Give at least one caption.")
    if strategy == "attentive" and self.model.image_encoder.pool == "attn":
      raise ValueError(
          "This model's image tower pools with attention (model.vision.pool='attn', as open_clip's coca_ViT-* "
          "models): it has no per-patch embeddings for attentive masking to score. Use strategy 'random' "
          "(--strategy=random), or a model with per-patch tokens (model.vision.pool='tok', e.g. coca_base).")
    ic, mim = self.ratios(ic_ratio, mim_ratio)
    if preprocessed:
      x = np.asarray(image)
      x = (x if x.dtype == np.uint8 else x.astype(np.float32)).reshape((-1, self.image_size, self.image_size, 3))
    else:
      x = inference.preprocess(image, self.image_size)
    if len(x) != 1:
      raise ValueError(f"Give one image; got {len(x)}.")
    key = (strategy, ic, mim, len(captions))
    if key not in self._fns:
      module = self.model.clone(masking=strategy, ic_ratio=ic, mim_ratio=mim)
      fn = functools.partial(_masks, reconstruct=self.has_image_decoder, norm_pix=self.norm_pix)
      self._fns[key] = jax.jit(lambda p, im, t, r: module.apply({"params": p}, im, t, r, method=fn))
    images = np.repeat(x, len(captions), axis=0)
    out = jax.device_get(self._fns[key](self.params, images, self.tokenizer.encode(captions),
                                        jax.random.PRNGKey(seed)))
    show = lambda a: np.clip(pixels.denormalize(np.asarray(a, np.float32)), 0.0, 1.0)
    return Masked(image=show(pixels.normalize(x[0])), captions=captions, scores=np.asarray(out["scores"], np.float32),
                  ic_keep=np.asarray(out["ic_keep"]), mim_visible=_get(out, "mim_visible"),
                  reconstruction=None if "reconstruction" not in out else show(out["reconstruction"]),
                  patch_size=self.model.image_encoder.patch_size, strategy=strategy, ic_ratio=ic, mim_ratio=mim)


def _get(d: dict, key: str) -> Optional[np.ndarray]:
  return None if key not in d else np.asarray(d[key])


# ------------------------------------------------------------------------------------------------------------------
# Drawing (PIL only: the tool needs no plotting library).
# ------------------------------------------------------------------------------------------------------------------

# matplotlib's viridis at five stops, interpolated linearly: dark blue (least relevant) -> yellow (most).
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32) / 255


def colormap(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1], any shape [...] -> RGB [..., 3] in [0, 1] (viridis)."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_VIRIDIS) - 1)
  lo = np.minimum(np.floor(v).astype(int), len(_VIRIDIS) - 2)
  t = (v - lo)[..., None]
  return _VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t


def upsample(grid_values: np.ndarray, patch_size: int) -> np.ndarray:
  """Per-patch values [N] or [N, C] on a square grid -> [S, S] or [S, S, C], each patch a p x p block."""
  g = int(round(grid_values.shape[0] ** 0.5))
  grid = grid_values.reshape((g, g) + grid_values.shape[1:])
  return np.repeat(np.repeat(grid, patch_size, axis=0), patch_size, axis=1)


def heat_map(masked: Masked, row: int, alpha: float = 0.7) -> np.ndarray:
  """The row's scores, min-max scaled, in colour over a grey copy of the input: [S, S, 3] in [0, 1]."""
  s = masked.scores[row]
  span = float(s.max() - s.min())
  scaled = (s - s.min()) / span if span > 0 else np.zeros_like(s)
  grey = masked.image.mean(-1, keepdims=True)
  return alpha * colormap(upsample(scaled, masked.patch_size)) + (1 - alpha) * grey


def dim_outside(image: np.ndarray, keep: np.ndarray, patch_size: int, level: float = 0.2) -> np.ndarray:
  """The image with the patches not in `keep` [N] darkened to `level` of their brightness."""
  factor = np.where(upsample(keep.astype(np.float32), patch_size) > 0.5, 1.0, level)
  return image * factor[..., None]


def panels(masked: Masked, row: int) -> dict[str, np.ndarray]:
  """The grid's panels for caption `row`, by column title, [S, S, 3] in [0, 1]."""
  p = masked.patch_size
  out = {"input": masked.image, "patch scores": heat_map(masked, row),
         "IC set": dim_outside(masked.image, masked.ic_keep[row], p)}
  if masked.mim_visible is not None:
    out["TG-MIM visible"] = dim_outside(masked.image, masked.mim_visible[row], p)
    out["TG-MIM reconstruction"] = masked.reconstruction[row]
  return out


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one bitmap size
    return ImageFont.load_default()


def render(masked: Masked, panel_size: int = 192, title: str = "") -> Image.Image:
  """The grid as an RGB image: a caption line, then the row's panels (module docstring), per caption."""
  s = masked.image.shape[0]
  scale = max(1, round(panel_size / s))
  px, gap, text_h = s * scale, max(4, scale * 2), 22
  columns = list(panels(masked, 0))
  width = len(columns) * px + (len(columns) + 1) * gap
  title_h = text_h if title else 0
  height = title_h + text_h + len(masked.captions) * (text_h + px + gap) + gap
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  font, small = _font(15), _font(13)
  if title:
    draw.text((gap, 4), title, fill="black", font=font)
  for c, name in enumerate(columns):
    label = name + (f" ({masked.strategy})" if name == "patch scores" else "")
    draw.text((gap + c * (px + gap), title_h + 4), label, fill=(60, 60, 60), font=small)
  y = title_h + text_h
  for r, caption in enumerate(masked.captions):
    s_row = masked.scores[r]
    draw.text((gap, y + 3), f'"{caption}"   (scores {s_row.min():.2f} .. {s_row.max():.2f})', fill="black",
              font=font)
    y += text_h
    for c, image in enumerate(panels(masked, r).values()):
      tile = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((px, px), Image.NEAREST)
      canvas.paste(tile, (gap + c * (px + gap), y))
    y += px + gap
  return canvas


# ------------------------------------------------------------------------------------------------------------------
# The command line.
# ------------------------------------------------------------------------------------------------------------------


def scene_image(spec: str, config: Optional[ml_collections.ConfigDict], image_size: int
                ) -> tuple[np.ndarray, list[str]]:
  """`scenes:SPLIT:INDEX` -> (uint8 image [S, S, 3] drawn at `image_size`, the scene's captions).

  The scene is drawn from the run config's scenes world (config.data: seed, object counts, backgrounds).
  """
  from sycoca_jax.data import scenes  # pylint: disable=g-import-not-at-top

  parts = spec.split(":")
  if len(parts) != 3 or not parts[2].isdigit():
    raise ValueError(f"--image={spec}: a built-in scene is scenes:SPLIT:INDEX, e.g. scenes:test:7.")
  data = (config or ml_collections.ConfigDict()).get("data", ml_collections.ConfigDict())
  sc = data.get("scenes", ml_collections.ConfigDict())
  kw = {k: sc[k] for k in ("min_objects", "max_objects") if k in sc}
  if "backgrounds" in sc:
    kw["backgrounds"] = tuple(sc.backgrounds)
  scene = scenes.sample_scene(int(data.get("seed", 0)), parts[1], int(parts[2]), **kw)
  return scenes.render_scene(scene, image_size), scenes.scene_captions(scene)


def main(argv):
  del argv
  from sycoca_jax import metrics  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(metrics.QuietLibraries())  # orbax's notes on every read-only load
  viewer = MaskViewer.load(FLAGS.workdir, FLAGS.step)
  image, captions = FLAGS.image, list(FLAGS.caption)
  if image.startswith("scenes:"):
    image, own = scene_image(image, viewer.config, viewer.image_size)
    captions = captions or own
  if not captions:
    raise app.UsageError("Give at least one --caption (a built-in scenes: image has captions of its own).")
  masked = viewer.masks(image, captions, strategy=FLAGS.strategy, ic_ratio=FLAGS.ic_ratio,
                        mim_ratio=FLAGS.mim_ratio, seed=FLAGS.seed)
  title = (f"{FLAGS.workdir} step {viewer.step}: IC keeps {1 - masked.ic_ratio:.0%} of the patches, TG-MIM hides "
           f"{masked.mim_ratio:.0%}")
  if not viewer.has_image_decoder:
    title += " (no trained image decoder: scores and IC set only)"
  render(masked, FLAGS.panel_size, title).save(FLAGS.out)
  print(f"Wrote {FLAGS.out}: {len(captions)} caption(s) x {len(panels(masked, 0))} panels.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
