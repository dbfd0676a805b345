"""Pixels as the image tower sees them: uint8 up to the device, CLIP-normalised inside the jitted program.

The input pipeline, the evaluators and the inference API hand over uint8 [..., S, S, 3] (a quarter of the bytes
of float32 at every stage: workers, shared memory, the training process, the host-to-device copy), and
`normalize` turns them into the model's float32 input where the program runs: the train step, and the
model's image entry points for everything else. One home for CLIP's statistics and for that multiply-add.
"""

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# x_normalised = x_uint8 * SCALE + OFFSET: one fused multiply-add instead of divide, subtract, divide.
SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD))).astype(np.float32)
OFFSET = (-np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)).astype(np.float32)


def normalize(images):
  """uint8 pixels [..., 3] -> float32 with CLIP's mean and std; anything else is taken as normalised already.

  Works on NumPy and JAX arrays alike (under jit it is one fused elementwise op). Float input passes through
  unchanged, so a caller that normalised itself (random test inputs, the benchmark) is not normalised twice.
  """
  if images.dtype != np.uint8:
    return images
  return images.astype(np.float32) * SCALE + OFFSET


def denormalize(images):
  """The inverse, to [0, 1] floats for display: float32 [..., 3] normalised -> [..., 3] in CLIP's pixel scale."""
  return images * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32)
