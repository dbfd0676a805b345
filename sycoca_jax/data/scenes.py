"""Built-in compositional scenes: the default, offline dataset.

A scene holds 1-4 objects on a 3x3 grid, one object per cell. An object is a geometric shape or a digit with
a colour, a size, a fill style and a small rotation, drawn over a background (gradient, coloured noise, a
texture or a crop of a real photo shipped inside scikit-image / scikit-learn) that keeps pixel
reconstruction from being trivial. Everything said about a scene is derived from its scene graph:

  captions   template sentences, each a *claim* that is checked true of the graph before it is worded:
             "a red circle left of a blue star", "two squares", "a green 7 in the top left", ...
  negatives  the same claims with one attribute / object / relation / count changed and checked false, for
             fine-grained retrieval evaluation (`negative_caption`).
  VQA        template question/answer pairs with single-word answers (`VQA_ANSWERS`).
  masks      per-object pixel masks, pooled to per-patch coverage for a patch size (`patch_masks`).

Scene i of a split is a pure function of (seed, split, i) (`sample_scene`), so any example can be produced
out of order, resumed exactly, and the train split is as large as one asks for.

Splits:
  train            colour-shape pairs in HELD_OUT_PAIRS never occur.
  test             1,000 scenes x 5 captions, same distribution as train.
  test_comp        1,000 scenes; each contains a held-out colour-shape pair and every caption is about it.
  zeroshot_shape   one geometric shape per scene, label = index in SHAPES (50 per class).
  zeroshot_colour  one geometric shape per scene, label = index in COLOURS (50 per class).
  zeroshot_digit   one digit per scene, label = the digit (50 per class).
  val, zeroshot_shape_val, zeroshot_colour_val, zeroshot_digit_val
                   validation twins of test and the zero-shot splits: the same distributions and sizes from draws
                   of their own, to tune on (and to report the test splits once).

Shapes: S image side in pixels, K objects in the scene, g = S / patch_size patches per side.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ------------------------------------------------------------------------------------------------ vocabulary

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
DIGITS = tuple("0123456789")
KINDS = SHAPES + DIGITS  # An object's 'shape' is one of these.

COLOURS = {  # name -> RGB; saturated and far apart so the colour word is unambiguous.
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 220, 30),
    "orange": (250, 135, 20), "purple": (130, 50, 180), "pink": (250, 120, 190), "brown": (120, 70, 30),
    "cyan": (30, 215, 225), "white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.9}  # Object extent as a fraction of its grid cell.

# Held-out colour-shape pairs: one colour per kind, spread so that every colour loses one or two kinds. They
# never occur in train/test; test_comp is built around them.
HELD_OUT_PAIRS = frozenset((kind, COLOUR_NAMES[(5 * k + 3) % len(COLOUR_NAMES)]) for k, kind in enumerate(KINDS))

SHAPE_WORDS = {
    "circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",), "star": ("star",),
    "hexagon": ("hexagon",), "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus"), "heart": ("heart",),
}
SHAPE_PLURALS = {
    "circle": "circles", "disc": "discs", "square": "squares", "box": "boxes", "triangle": "triangles",
    "star": "stars", "hexagon": "hexagons", "diamond": "diamonds", "rhombus": "rhombuses", "cross": "crosses",
    "plus": "pluses", "heart": "hearts",
}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"gray": ("gray", "grey"), "purple": ("purple", "violet")}
COLOUR_VOCAB = tuple(sorted({w for words in COLOUR_WORDS.values() for w in words}))  # loss.words_vocab='nouns_colours'
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium",), "large": ("large", "big")}
FILL_WORDS = {True: ("solid", "filled"), False: ("outlined", "hollow")}
GENERIC_NOUNS = ("object", "shape", "thing")
GENERIC_PLURALS = {"object": "objects", "shape": "shapes", "thing": "things"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# The words that name an object (its kind, in the singular or plural, or a generic noun): the nouns a caption's
# objects are named by (loss.words_vocab='nouns').
NOUNS = tuple(sorted({*SHAPE_PLURALS, *SHAPE_PLURALS.values(), *DIGITS, *(f"{d}s" for d in DIGITS),
                      *GENERIC_NOUNS, *GENERIC_PLURALS.values()}))
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
CELL_PHRASES = {
    (0, 0): ("in the top left",), (0, 1): ("at the top",), (0, 2): ("in the top right",),
    (1, 0): ("on the left",), (1, 1): ("in the center", "in the middle"), (1, 2): ("on the right",),
    (2, 0): ("in the bottom left",), (2, 1): ("at the bottom",), (2, 2): ("in the bottom right",),
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_WORDS = {
    "left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
    "above": ("above", "over"), "below": ("below", "under", "beneath"),
}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")

VQA_ANSWERS = ("yes", "no", *NUMBER_WORDS, *COLOUR_NAMES, *KINDS)

# Prompts are worded as the training captions are (no full stop, only caption words), so that a prompt is a
# sentence the text tower has seen the like of: "a circle" ~ "a red circle", "one 7" ~ "one 7" (a count claim).
ZEROSHOT = {  # split -> (class names, prompt templates, attribute the label indexes)
    "zeroshot_shape": (SHAPES, ("a {}", "a picture of a {}", "one {}"), "shape"),
    "zeroshot_colour": (COLOUR_NAMES, ("a {} shape", "a {} object", "one {} thing"), "colour"),
    "zeroshot_digit": (DIGITS, ("a digit {}", "a number {}", "one {}"), "shape"),
}
VAL_SUFFIX = "_val"
ZEROSHOT |= {name + VAL_SUFFIX: task for name, task in ZEROSHOT.items()}
EVAL_SIZES = {"test": 1000, "test_comp": 1000, "val": 1000} | {name: 50 * len(z[0]) for name, z in ZEROSHOT.items()}
# A split's id seeds its scenes: ids are only ever appended, so every existing split keeps its scenes.
SPLIT_IDS = {"train": 0, "test": 1, "test_comp": 2, "zeroshot_shape": 3, "zeroshot_colour": 4, "zeroshot_digit": 5,
             "val": 6, "zeroshot_shape_val": 7, "zeroshot_colour_val": 8, "zeroshot_digit_val": 9}


def vocabulary() -> list[str]:
  """Every word a caption, question or answer of the scenes can contain (for the word-level tokenizer)."""
  phrases = [*PREFIXES, *GENERIC_NOUNS, *GENERIC_PLURALS.values(), *NUMBER_WORDS, *VQA_ANSWERS,
             *SHAPE_PLURALS, *SHAPE_PLURALS.values(), *(f"{d}s digit number" for d in DIGITS),
             "a an and there is are what color shape how many in the image ? , .", *_QUESTION_WORDS]
  for table in (COLOUR_WORDS, SIZE_WORDS, FILL_WORDS, CELL_PHRASES, RELATION_WORDS):
    phrases += [p for options in table.values() for p in options]
  return sorted({w for p in phrases for w in p.replace("?", " ? ").replace(",", " , ").split()})


# ------------------------------------------------------------------------------------------------ scene graph


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str      # one of KINDS
  colour: str     # one of COLOUR_NAMES
  size: str       # one of SIZES
  row: int        # grid cell, 0..2 from the top
  col: int        # grid cell, 0..2 from the left
  filled: bool    # False: drawn as an outline
  rotation: float  # degrees, counter-clockwise
  cx: float       # centre in [0, 1] image coordinates (x to the right, y down)
  cy: float

  @property
  def is_digit(self) -> bool:
    return self.shape in DIGITS

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"position": CELL_NAMES[self.row, self.col]}


@dataclasses.dataclass(frozen=True)
class Scene:
  seed: int
  split: str
  index: int
  objects: tuple[SceneObject, ...]
  background: dict  # kind + parameters, all drawn at sampling time so rendering is deterministic.

  def relations(self) -> list[tuple[int, str, int]]:
    """Every (i, relation, j) that holds between objects i and j, both directions."""
    return [(i, rel, j) for i, a in enumerate(self.objects) for j, b in enumerate(self.objects)
            if i != j for rel in RELATIONS if _relation_holds(a, rel, b)]

  def graph(self) -> dict:
    return {"objects": [o.as_dict() for o in self.objects], "relations": self.relations(),
            "background": self.background["kind"]}


def _relation_holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
  return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def _choice(rng, options: Sequence):
  # Exactly one draw whatever len(options) (rng.integers(1) draws nothing), so that wording a claim and its
  # perturbed copy from the same generator state picks the same words wherever the two agree.
  return options[int(rng.random() * len(options))]


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  """Independent generator per (seed, split, scene, purpose): layout, captions and VQA never share draws."""
  return np.random.default_rng([seed, SPLIT_IDS[split], index, stream])


def _sample_object(rng, cell: int, shape: str | None = None, colour: str | None = None,
                   allow_held_out: bool = False) -> SceneObject:
  if shape is None:  # Digits and geometric shapes equally often, whatever their numbers.
    shape = _choice(rng, DIGITS if rng.random() < 0.5 else SHAPES)
  if colour is None:
    colour = _choice(rng, [c for c in COLOUR_NAMES if allow_held_out or (shape, c) not in HELD_OUT_PAIRS])
  size = _choice(rng, tuple(SIZES))
  row, col = divmod(cell, 3)
  # Jitter within the cell, never past its border, so objects do not touch and relations stay clear-cut.
  slack = (1.0 - SIZES[size]) / 2 / 3
  cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
  cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
  geometric = shape in SHAPES and shape != "circle"
  return SceneObject(shape=shape, colour=colour, size=size, row=row, col=col,
                     filled=bool(shape in DIGITS or rng.random() < 0.8),
                     rotation=float(rng.uniform(-25, 25)) if geometric else 0.0, cx=float(cx), cy=float(cy))


# Background kinds and how often each is drawn (photos twice as often as the others).
BACKGROUNDS = ("gradient", "noise", "texture", "photo", "photo")


def _sample_background(rng, kinds: Sequence[str] = BACKGROUNDS) -> dict:
  kind = _choice(rng, kinds)
  colours = rng.integers(0, 256, size=(2, 3)).tolist()
  params = {"kind": kind, "colours": colours, "angle": float(rng.uniform(0, 2 * np.pi)),
            "noise_seed": int(rng.integers(2**31)), "noise_cells": int(rng.integers(3, 9))}
  if kind in ("texture", "photo"):
    names = _TEXTURES if kind == "texture" else _PHOTOS
    params["image"] = names[int(rng.integers(len(names)))]
    params["crop"] = [float(x) for x in (rng.uniform(0.3, 0.8), rng.uniform(0, 1), rng.uniform(0, 1))]
  return params


def sample_scene(seed: int, split: str, index: int, *, min_objects: int = 1, max_objects: int = 4,
                 backgrounds: Sequence[str] = BACKGROUNDS) -> Scene:
  """Scene `index` of `split`: a pure function of its arguments.

  `backgrounds` lists the background kinds to draw from (repeats weight them). Restricting it changes only the
  backgrounds: the objects, captions and questions of scene i stay the same.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f"Unknown scenes split {split!r}; known: {sorted(SPLIT_IDS)}")
  unknown = set(backgrounds) - set(BACKGROUNDS)
  if unknown or not backgrounds:
    raise ValueError(f"Unknown or no scenes backgrounds {sorted(unknown)}; choose from {sorted(set(BACKGROUNDS))}.")
  rng = _rng(seed, split, index, 0)
  background = _sample_background(rng)
  if background["kind"] not in backgrounds:
    # Redrawn from a stream of its own, so the layout draws that follow are those of the unrestricted scene.
    background = _sample_background(_rng(seed, split, index, 3), tuple(backgrounds))
  if split in ZEROSHOT:
    classes, _, attribute = ZEROSHOT[split]
    label = classes[index % len(classes)]
    pool = DIGITS if split.removesuffix(VAL_SUFFIX) == "zeroshot_digit" else SHAPES
    shape = label if attribute == "shape" else _choice(rng, pool)
    colour = label if attribute == "colour" else None
    if colour is not None and (shape, colour) in HELD_OUT_PAIRS:  # keep zero-shot sets inside train's pairs
      shape = _choice(rng, [s for s in pool if (s, colour) not in HELD_OUT_PAIRS])
    objects = [_sample_object(rng, int(rng.integers(9)), shape=shape, colour=colour)]
  else:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    objects = []
    if split == "test_comp":  # The first object carries a held-out pair; captions will be about it.
      shape, colour = sorted(HELD_OUT_PAIRS)[int(rng.integers(len(HELD_OUT_PAIRS)))]
      objects.append(_sample_object(rng, int(cells[0]), shape=shape, colour=colour, allow_held_out=True))
    objects += [_sample_object(rng, int(c)) for c in cells[len(objects):]]
  return Scene(seed=seed, split=split, index=index, objects=tuple(objects), background=background)


def label_of(scene: Scene) -> int:
  """Class index of a zero-shot scene."""
  classes, _, attribute = ZEROSHOT[scene.split]
  return classes.index(getattr(scene.objects[0], attribute))


# ------------------------------------------------------------------------------------------------ rendering

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "moon.png")
_SKIMAGE_TEXTURES = ("brick.png", "grass.png", "gravel.png")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_PHOTOS = tuple(f"skimage:{n}" for n in _SKIMAGE_PHOTOS) + tuple(f"sklearn:{n}" for n in _SKLEARN_PHOTOS)
_TEXTURES = tuple(f"skimage:{n}" for n in _SKIMAGE_TEXTURES)


@functools.lru_cache(maxsize=None)
def _library_image(name: str) -> Image.Image:
  """A photo or texture bundled in the scikit-image / scikit-learn wheels, as RGB (read once per process)."""
  package, filename = name.split(":")
  if package == "skimage":
    import skimage.data  # pylint: disable=g-import-not-at-top
    directory = os.path.dirname(skimage.data.__file__)
  else:
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    directory = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
  path = os.path.join(directory, filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Scenes background {filename!r} is not bundled with {package} here ({path}).")
  with Image.open(path) as im:
    return im.convert("RGB")


def _noise(rng, size: int, cells: int, amplitude: float) -> np.ndarray:
  """Smooth colour noise: a cells x cells random grid upsampled bicubically, plus a little pixel noise."""
  grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)
  return smooth * amplitude + 8 * rng.standard_normal((size, size, 3), dtype=np.float32)


def _render_background(params: dict, size: int) -> Image.Image:
  rng = np.random.default_rng(params["noise_seed"])
  kind = params["kind"]
  if kind == "gradient":
    t = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = (np.cos(params["angle"]) * t[None, :] + np.sin(params["angle"]) * t[:, None]) / 2.8 + 0.5
    a, b = (np.asarray(c, np.float32) for c in params["colours"])
    pixels = a + ramp[..., None] * (b - a) + 6 * rng.standard_normal((size, size, 3), dtype=np.float32)
  elif kind == "noise":
    pixels = 0.5 * np.asarray(params["colours"][0], np.float32) + _noise(rng, size, params["noise_cells"], 0.5)
  else:
    source = _library_image(params["image"])
    side_frac, x_frac, y_frac = params["crop"]
    side = side_frac * min(source.size)
    x0, y0 = x_frac * (source.width - side), y_frac * (source.height - side)
    # reducing_gap: shrink by an integer factor first (cheap box filter), then resample; 3x faster.
    crop = source.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0)
    pixels = np.asarray(crop, np.float32)
    if kind == "texture":  # grey textures, tinted with a random colour
      pixels = pixels * (0.4 + 0.6 * np.asarray(params["colours"][0], np.float32) / 255)
    # Wash the photo towards grey so that saturated object colours stay readable on top of it.
    pixels = 0.6 * pixels + 0.4 * 128
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _unit_polygon(shape: str) -> np.ndarray:
  """Vertices [V, 2] of a shape inscribed in the unit disc, y pointing up."""
  if shape == "square":
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.75
  if shape == "triangle":
    angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.stack([np.cos(angles), np.sin(angles)], -1) + np.array([0, -0.15])
  if shape == "hexagon":
    angles = np.arange(6) * np.pi / 3
    return np.stack([np.cos(angles), np.sin(angles)], -1)
  if shape == "diamond":  # taller than wide, so that it is never a rotated square
    return np.array([[0, 1], [0.6, 0], [0, -1], [-0.6, 0]])
  if shape == "star":
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([np.cos(angles), np.sin(angles)], -1) * radii[:, None]
  if shape == "cross":
    a, b = 0.3, 0.9
    return np.array([[-a, b], [a, b], [a, a], [b, a], [b, -a], [a, -a], [a, -b], [-a, -b], [-a, -a],
                     [-b, -a], [-b, a], [-a, a]])
  if shape == "heart":
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y + 2.5], -1) / 17
  raise ValueError(f"Not a polygon shape: {shape!r}")


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=px)


def _draw_object_mask(obj: SceneObject, size: int) -> tuple[Image.Image, tuple[int, int]]:
  """The object's pixels as an 'L' mask (255 inside) and the mask's top-left corner on the S x S canvas.

  The mask covers only a box around the object: drawing and pasting full-canvas masks cost 4x more at 224 px.
  """
  radius = SIZES[obj.size] * size / 6  # half the object extent; a cell is size / 3 wide
  outline_width = max(1, round(radius / 4))
  half = int(np.ceil(1.25 * radius)) + outline_width + 2  # every shape fits in 1.15 radius, plus its stroke
  x0, y0 = max(0, int(obj.cx * size) - half), max(0, int(obj.cy * size) - half)
  x1, y1 = min(size, int(obj.cx * size) + half + 1), min(size, int(obj.cy * size) + half + 1)
  cx, cy = obj.cx * size - x0, obj.cy * size - y0  # centre in box coordinates
  mask = Image.new("L", (x1 - x0, y1 - y0), 0)
  draw = ImageDraw.Draw(mask)
  if obj.is_digit:
    # The font's digit glyphs are about 0.72 em tall: pick the em size that makes the digit 2 * radius tall.
    # A stroke makes the glyph bold enough to keep solid pixels at 64 px.
    draw.text((cx, cy), obj.shape, fill=255, font=_font(max(4, round(2 * radius / 0.72))), anchor="mm",
              stroke_width=max(1, round(radius / 6)), stroke_fill=255)
  elif obj.shape == "circle":
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw.ellipse(box, fill=255 if obj.filled else None, outline=255, width=outline_width)
  else:
    theta = np.deg2rad(obj.rotation)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    vertices = _unit_polygon(obj.shape) @ rotation.T * radius
    points = [(cx + x, cy - y) for x, y in vertices]  # image y grows downwards
    if obj.filled:
      draw.polygon(points, fill=255)
    else:
      draw.line(points + points[:1], fill=255, width=outline_width, joint="curve")
  return mask, (x0, y0)


def render_scene(scene: Scene, size: int = 64, *, with_masks: bool = False):
  """Draws the scene.

  Returns:
    image: uint8 [S, S, 3]; and, with `with_masks`, masks: bool [K, S, S], one per object.
  """
  image = _render_background(scene.background, size)
  masks = np.zeros((len(scene.objects), size, size), bool) if with_masks else None
  for k, obj in enumerate(scene.objects):
    mask, (x0, y0) = _draw_object_mask(obj, size)
    image.paste(COLOURS[obj.colour], (x0, y0, x0 + mask.width, y0 + mask.height), mask=mask)
    if with_masks:
      masks[k, y0 : y0 + mask.height, x0 : x0 + mask.width] = np.asarray(mask) > 127
  image = np.asarray(image)
  return (image, masks) if with_masks else image


def patch_masks(masks: np.ndarray, patch_size: int) -> np.ndarray:
  """Per-object patch coverage: bool [K, S, S] -> float32 [K, g, g], the fraction of each patch covered."""
  k, s, _ = masks.shape
  if s % patch_size:
    raise ValueError(f"Image size {s} is not divisible by patch size {patch_size}.")
  g = s // patch_size
  return masks.reshape(k, g, patch_size, g, patch_size).mean(axis=(2, 4), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ claims
#
# A claim is a small dict that can be checked against a scene and worded in several ways:
#   {"type": "exists", "obj": desc}                    "a red circle", "a big red circle in the top left"
#   {"type": "relation", "a": desc, "rel": r, "b": desc}  "a red circle left of a blue star"
#   {"type": "count", "n": n, "obj": desc}             "two squares", "three red objects"
#   {"type": "list", "objs": [desc, ...]}              "a red circle, a blue 7 and a green star"
# where desc holds a subset of {shape, colour, size, filled, cell} that an object must match.


def _describe(obj: SceneObject, rng, extra: float = 0.0) -> dict:
  """A description of obj: colour and shape, plus size and fill style each with probability `extra`."""
  desc = {"shape": obj.shape, "colour": obj.colour}
  if rng.random() < extra:
    desc["size"] = obj.size
  if rng.random() < extra and not obj.is_digit:
    desc["filled"] = obj.filled
  return desc


def _matches(obj: SceneObject, desc: dict) -> bool:
  return all((obj.row, obj.col) == v if k == "cell" else getattr(obj, k) == v for k, v in desc.items())


def claim_holds(scene: Scene, claim: dict) -> bool:
  objs = scene.objects
  kind = claim["type"]
  if kind == "exists":
    return any(_matches(o, claim["obj"]) for o in objs)
  if kind == "count":
    return sum(_matches(o, claim["obj"]) for o in objs) == claim["n"]
  if kind == "relation":
    return any(_matches(a, claim["a"]) and _matches(b, claim["b"]) and _relation_holds(a, claim["rel"], b)
               for a in objs for b in objs if a is not b)
  if kind == "list":  # each description matched by a different object
    used = set()
    for desc in claim["objs"]:
      free = [i for i, o in enumerate(objs) if i not in used and _matches(o, desc)]
      if not free:
        return False
      used.add(free[0])
    return True
  raise ValueError(f"Unknown claim type {kind!r}")


def _sample_claim(scene: Scene, rng, focus: int | None) -> dict:
  """A true claim about the scene; with `focus`, about that object."""
  objs = scene.objects
  pick = (lambda: focus) if focus is not None else (lambda: int(rng.integers(len(objs))))
  kinds = ["exists", "position", "count", "list"] + ["relation"] * 2 * (len(objs) > 1)
  kind = _choice(rng, kinds)
  if kind == "relation":
    i = pick()
    j = _choice(rng, [j for j in range(len(objs)) if j != i])
    rel = _choice(rng, [r for r in RELATIONS if _relation_holds(objs[i], r, objs[j])])
    a, b = _describe(objs[i], rng, 0.15), _describe(objs[j], rng, 0.15)
    return {"type": "relation", "a": a, "rel": rel, "b": b} if rng.random() < 0.5 else \
        {"type": "relation", "a": b, "rel": OPPOSITE[rel], "b": a}
  if kind == "count":
    o = objs[pick()]
    descs = [{"shape": o.shape, "colour": o.colour}, {"shape": o.shape}, {"colour": o.colour}, {}]
    # A focused claim names the focus object's colour and shape (test_comp: its held-out pair).
    desc = descs[0] if focus is not None else _choice(rng, descs)
    return {"type": "count", "n": sum(_matches(x, desc) for x in objs), "obj": desc}
  if kind == "list":
    order = rng.permutation(len(objs)).tolist()
    if focus is not None:
      order.remove(focus)
      order.insert(0, focus)
    return {"type": "list", "objs": [_describe(objs[i], rng, 0.1) for i in order]}
  obj = objs[pick()]
  desc = _describe(obj, rng, 0.4)
  if kind == "position":
    desc["cell"] = (obj.row, obj.col)
  return {"type": "exists", "obj": desc}


def _with_article(phrase: str) -> str:
  vowel = phrase[0] in "aeiou8" or phrase.startswith(("11 ", "18 "))
  return ("an " if vowel else "a ") + phrase


def _noun_phrase(desc: dict, rng, *, plural: bool = False) -> str:
  words = []
  if "size" in desc:
    words.append(_choice(rng, SIZE_WORDS[desc["size"]]))
  if "filled" in desc:
    words.append(_choice(rng, FILL_WORDS[desc["filled"]]))
  if "colour" in desc:
    words.append(_choice(rng, COLOUR_WORDS[desc["colour"]]))
  shape = desc.get("shape")
  if shape is None:
    noun = _choice(rng, GENERIC_NOUNS)
    noun = GENERIC_PLURALS[noun] if plural else noun
  elif shape in DIGITS:
    noun = f"{shape}s" if plural else _choice(rng, (shape, f"digit {shape}", f"number {shape}"))
  else:
    noun = _choice(rng, SHAPE_WORDS[shape])
    noun = SHAPE_PLURALS[noun] if plural else noun
  phrase = " ".join(words + [noun])
  if "cell" in desc:
    phrase += " " + _choice(rng, CELL_PHRASES[desc["cell"]])
  return phrase if plural else _with_article(phrase)


def word_claim(claim: dict, rng) -> str:
  kind = claim["type"]
  if kind == "exists":
    text = _noun_phrase(claim["obj"], rng)
  elif kind == "relation":
    rel = _choice(rng, RELATION_WORDS[claim["rel"]])
    text = f"{_noun_phrase(claim['a'], rng)} {rel} {_noun_phrase(claim['b'], rng)}"
  elif kind == "count":
    n = claim["n"]
    phrase = _noun_phrase(claim["obj"], rng, plural=n != 1)
    if n == 1:  # "one red circle", not "one a red circle"
      phrase = phrase.split(" ", 1)[1]
    text = f"{NUMBER_WORDS[n]} {phrase}"
    if rng.random() < 0.3:
      return ("there is " if n == 1 else "there are ") + text
  else:
    phrases = [_noun_phrase(d, rng) for d in claim["objs"]]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
  return _choice(rng, PREFIXES) + text


def scene_captions(scene: Scene, num: int = 5) -> list[str]:
  """`num` captions, each a true claim about the scene, distinct where the scene allows."""
  rng = _rng(scene.seed, scene.split, scene.index, 1)
  focus = 0 if scene.split == "test_comp" else None
  captions = []
  for _ in range(20 * num):
    claim = _sample_claim(scene, rng, focus)
    text = word_claim(claim, rng)
    if text not in captions:
      captions.append(text)
    if len(captions) == num:
      break
  while len(captions) < num:  # tiny scenes have few distinct sentences: repeat rather than fail
    captions.append(captions[len(captions) % max(1, len(captions))])
  return captions


# ------------------------------------------------------------------------------------------------ negatives

NEGATIVE_KINDS = ("attribute", "object", "relation", "count")


def _perturb(claim: dict, kind: str, rng) -> dict | None:
  """Claim with one thing of `kind` changed, or None if the claim has nothing of that kind."""
  if kind == "relation":
    if claim["type"] != "relation":
      return None
    if rng.random() < 0.5:
      return claim | {"rel": OPPOSITE[claim["rel"]]}
    return claim | {"a": claim["b"], "b": claim["a"]}
  if kind == "count":
    if claim["type"] != "count":
      return None
    return claim | {"n": _choice(rng, [n for n in range(1, 5) if n != claim["n"]])}
  # attribute / object: change one description inside the claim
  if claim["type"] == "list":
    return None
  key = _choice(rng, ["a", "b"]) if claim["type"] == "relation" else "obj"
  desc = dict(claim[key])
  if kind == "object":
    if "shape" not in desc:
      return None
    pool = DIGITS if desc["shape"] in DIGITS else SHAPES
    desc["shape"] = _choice(rng, [s for s in pool if s != desc["shape"]])
  else:
    attrs = [a for a in ("colour", "size", "filled") if a in desc]
    if not attrs:
      return None
    attr = _choice(rng, attrs)
    values = {"colour": COLOUR_NAMES, "size": tuple(SIZES), "filled": (True, False)}[attr]
    desc[attr] = _choice(rng, [v for v in values if v != desc[attr]])
  return claim | {key: desc}


def negative_caption(scene: Scene, kind: str, rng: np.random.Generator, tries: int = 50) -> tuple[str, str] | None:
  """A (true caption, false caption) pair differing in one thing of `kind` (one of NEGATIVE_KINDS).

  The false caption is checked false of the scene graph. Returns None when the scene cannot support that kind
  (e.g. no relation in a one-object scene).
  """
  if kind not in NEGATIVE_KINDS:
    raise ValueError(f"Unknown negative kind {kind!r}; known: {NEGATIVE_KINDS}")
  for _ in range(tries):
    claim = _sample_claim(scene, rng, None)
    if kind == "relation" and len(scene.objects) > 1 and claim["type"] != "relation":
      continue
    negative = _perturb(claim, kind, rng)
    if negative is None or claim_holds(scene, negative):
      continue
    # Word both with the same draws, so the sentences differ only where the claims do.
    positive_text, negative_text = _with_same_draws(rng, lambda c: word_claim(c, rng), (claim, negative))
    return positive_text, negative_text
  return None


def _with_same_draws(rng: np.random.Generator, fn, items) -> list:
  """[fn(item) for item in items], each call starting from the generator state the first one had."""
  state, out = rng.bit_generator.state, []
  for item in items:
    rng.bit_generator.state = state
    out.append(fn(item))
  return out


def twin_scene(scene: Scene, rng: np.random.Generator, tries: int = 50) -> tuple[Scene, str, str]:
  """(twin, caption, twin's caption): the scene with one object's kind changed (a shape for a shape, a digit for a
  digit; colour, size, place and background kept), and a caption of each that is false of the other.

  Both captions are one claim about the changed object, drawn and worded with the same draws, so they differ in
  its kind alone ("a red circle left of a 7" / "a red star left of a 7"). With `data.scenes.twins` a training
  batch holds both images with both captions: contrastive training can only tell the pair apart by kind.
  """
  for attempt in range(tries + 1):
    i = int(rng.integers(len(scene.objects)))
    old = scene.objects[i]
    pool = DIGITS if old.is_digit else SHAPES
    changed = dataclasses.replace(old, shape=_choice(rng, [k for k in pool if k != old.shape]))
    twin = dataclasses.replace(scene, objects=scene.objects[:i] + (changed,) + scene.objects[i + 1:])
    if attempt < tries:  # a claim about object i, drawn alike in both scenes (they differ in its kind only)
      claims = _with_same_draws(rng, lambda s: _sample_claim(s, rng, i), (scene, twin))
    else:  # the object named with its place, which no other object shares: true of one scene only
      claims = [{"type": "exists", "obj": {"shape": o.shape, "colour": o.colour, "cell": (o.row, o.col)}}
                for o in (old, changed)]
    if not (claim_holds(scene, claims[0]) and claim_holds(twin, claims[1])
            and not claim_holds(twin, claims[0]) and not claim_holds(scene, claims[1])):
      continue
    caption, twin_caption = _with_same_draws(rng, lambda c: word_claim(c, rng), claims)
    return twin, caption, twin_caption
  raise AssertionError("unreachable: the last attempt's claims always tell the two scenes apart")


# ------------------------------------------------------------------------------------------------ VQA

_QUESTION_WORDS = ("what color is the", "what shape is", "how many are there", "is there", "what is")


def vqa_pairs(scene: Scene, num: int = 4) -> list[tuple[str, str]]:
  """Template question/answer pairs; every answer is one of VQA_ANSWERS."""
  rng = _rng(scene.seed, scene.split, scene.index, 2)
  objs = scene.objects
  pairs = []
  for _ in range(10 * num):
    kind = int(rng.integers(5))
    obj = objs[int(rng.integers(len(objs)))]
    if kind == 0:
      if sum(o.shape == obj.shape for o in objs) != 1:  # "the square" must be unique
        continue
      noun = f"digit {obj.shape}" if obj.is_digit else SHAPE_WORDS[obj.shape][0]
      pair = (f"what color is the {noun} ?", obj.colour)
    elif kind == 1:
      pair = (f"what is {CELL_PHRASES[obj.row, obj.col][0]} ?", obj.shape)
    elif kind == 2:
      shape = _choice(rng, KINDS)
      noun = f"{shape}s" if shape in DIGITS else SHAPE_PLURALS[shape]
      pair = (f"how many {noun} are there ?", NUMBER_WORDS[sum(o.shape == shape for o in objs)])
    elif kind == 3:
      pair = ("how many objects are there ?", NUMBER_WORDS[len(objs)])
    else:
      desc = {"shape": obj.shape, "colour": obj.colour}
      if rng.random() < 0.5:  # ask about something absent half of the time
        desc["colour"] = _choice(rng, [c for c in COLOUR_NAMES if c != obj.colour])
      answer = "yes" if any(_matches(o, desc) for o in objs) else "no"
      pair = (f"is there {_noun_phrase(desc, rng)} ?", answer)
    if pair not in pairs:
      pairs.append(pair)
    if len(pairs) == num:
      break
  return pairs


# ------------------------------------------------------------------------------------------------ data source


class ScenesSource:
  """Random-access source of rendered scenes (grain's RandomAccessDataSource protocol).

  Element i: {'image': uint8 [S, S, 3], 'captions': list[str], 'id': int} plus, for zero-shot splits,
  'label': int, with `patch_size`, 'object_patches': float32 [K, g, g], and with `hard_negatives` (kinds of
  NEGATIVE_KINDS), 'hard_negatives': list[str], caption j's false twin (training's pairwise ITC term).

  With `twins`, records come in pairs: 2 i is scene i and 2 i + 1 its twin (`twin_scene`: one object's kind
  changed), each with one caption, false of the other (`paired`: the input pipeline keeps the two together).
  """

  def __init__(self, split: str = "train", *, seed: int = 0, image_size: int = 64, num_captions: int = 5,
               num_examples: int | None = None, min_objects: int = 1, max_objects: int = 4,
               patch_size: int | None = None, backgrounds: Sequence[str] = BACKGROUNDS,
               hard_negatives: Sequence[str] = (), twins: bool = False):
    if split not in SPLIT_IDS:
      raise ValueError(f"Unknown scenes split {split!r}; known: {sorted(SPLIT_IDS)}")
    unknown = [k for k in hard_negatives if k not in NEGATIVE_KINDS]
    if unknown:
      raise ValueError(f"config.data.scenes.hard_negatives: {unknown} not in {NEGATIVE_KINDS}.")
    if twins and (hard_negatives or split in ZEROSHOT):
      raise ValueError("config.data.scenes.twins: pairs of captioned scenes, not with hard_negatives (another kind "
                       "of hard negative) nor on a zero-shot split.")
    if not 1 <= min_objects <= max_objects <= 4:
      raise ValueError(f"Need 1 <= min_objects <= max_objects <= 4, got {min_objects}, {max_objects}.")
    self.split, self.seed, self.image_size = split, seed, image_size
    self.num_captions, self.min_objects, self.max_objects = num_captions, min_objects, max_objects
    self.patch_size = patch_size
    self.backgrounds = tuple(backgrounds)
    self.hard_negatives = tuple(hard_negatives)
    self.paired = bool(twins)
    # Train is unbounded in principle; 2**31 - 1 keeps ids in int32 and is more than any run will read.
    self._len = num_examples or EVAL_SIZES.get(split, 2**31 - 1)
    if self.paired:  # two records per scene, an even count within int32
      self._len = 2 * num_examples if num_examples else 2**31 - 2

  def __len__(self) -> int:
    return self._len

  def scene(self, index: int) -> Scene:
    return sample_scene(self.seed, self.split, index, min_objects=self.min_objects, max_objects=self.max_objects,
                        backgrounds=self.backgrounds)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"Scene {index} out of range for {self.split!r} of size {self._len}.")
    scene, captions = self._scene_and_captions(index)
    element = {"captions": captions, "id": index}
    if self.hard_negatives:
      element["captions"], element["hard_negatives"] = self.caption_pairs(scene)
    if self.patch_size:
      element["image"], masks = render_scene(scene, self.image_size, with_masks=True)
      element["object_patches"] = patch_masks(masks, self.patch_size)
    else:
      element["image"] = render_scene(scene, self.image_size)
    if self.split in ZEROSHOT:
      element["label"] = label_of(scene)
    return element

  def _scene_and_captions(self, index: int) -> tuple[Scene, list[str]]:
    """Record `index`'s scene and captions; with `twins`, one of a pair and its one caption."""
    if not self.paired:
      scene = self.scene(index)
      return scene, scene_captions(scene, self.num_captions)
    scene, twin, captions = self.twin_pair(index // 2)
    return (twin, [captions[1]]) if index % 2 else (scene, [captions[0]])

  def twin_pair(self, index: int) -> tuple[Scene, Scene, tuple[str, str]]:
    """Scene `index`, its twin, and their captions (records 2 index and 2 index + 1 with `twins`)."""
    scene = self.scene(index)
    twin, caption, twin_caption = twin_scene(scene, _rng(scene.seed, scene.split, scene.index, 4))
    return scene, twin, (caption, twin_caption)

  def caption_pairs(self, scene: Scene) -> tuple[list[str], list[str]]:
    """num_captions true captions, each with a false twin that differs in one thing of a hard_negatives kind
    (negative_caption); where the scene has nothing of that kind, a plain caption whose twin is itself."""
    rng = _rng(scene.seed, scene.split, scene.index, 3)
    captions, negatives = [], []
    for j in range(self.num_captions):
      pair = negative_caption(scene, self.hard_negatives[j % len(self.hard_negatives)], rng)
      if pair is None:
        caption = scene_captions(scene, self.num_captions)[j]
        pair = (caption, caption)
      captions.append(pair[0])
      negatives.append(pair[1])
    return captions, negatives

  def annotations(self, index: int) -> dict:
    """Everything but the image: captions, scene graph, VQA pairs and, for zero-shot splits, the label."""
    scene, captions = self._scene_and_captions(index)
    out = {"captions": captions, "scene_graph": scene.graph(), "qa": vqa_pairs(scene)}
    if self.split in ZEROSHOT:
      out["label"] = label_of(scene)
    return out

  answers = VQA_ANSWERS

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return ZEROSHOT[self.split][0] if self.split in ZEROSHOT else None

  @property
  def templates(self) -> tuple[str, ...] | None:
    return ZEROSHOT[self.split][1] if self.split in ZEROSHOT else None

  def __repr__(self) -> str:
    return f"ScenesSource(split={self.split!r}, seed={self.seed}, image_size={self.image_size}, len={self._len})"
