r"""Captioning throughput with and without the KV cache, greedy and beam search, on random weights.

  python -m sycoca_jax.tools.decode_benchmark                      # tiny and base geometries
  python -m sycoca_jax.tools.decode_benchmark --geometries=base --base_batch=4 --repeats=5

Geometries: `tiny` is configs/sycoca_tiny.py's model (64 px, patch 8, 64 patches, width 128, text encoder 4
layers, multimodal decoder 2 layers, scenes word vocabulary); `base` is default_model_config(), the paper's
CoCa-Base (288 px, patch 18, 324 patches, 12 + 12 layers of width 768, CLIP BPE vocabulary of 49,408).

What is timed: sampling only, from image tokens encoded beforehand (the image pass is the same with or
without a cache). eos is forbidden until the last position (min_len = max_len - 1), so every run makes
exactly max_len - 1 steps; tokens/s = batch * (max_len - 1) / seconds, counting output caption tokens (a
beam search over K beams computes K times as many). The uncached path recomputes the text tower, the decoder
and the decoder's image keys / values over the whole prefix at every step (decoding.model_decoder with
cache=False). Medians over --repeats runs after one compile-and-run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax import decoding
from sycoca_jax.models.sycoca import SyCoCa, build_model, default_model_config


def tiny_config():
  """The model of configs/sycoca_tiny.py (kept in step by hand: configs/ is not part of the package)."""
  from sycoca_jax.data import get_tokenizer  # pylint: disable=g-import-not-at-top

  c = default_model_config()
  c.embed_dim = 128
  c.vision.update(image_size=64, patch_size=8, width=128, depth=4, heads=4)
  c.text.update(vocab_size=get_tokenizer("scenes_words", max_len=24).vocab_size, context_length=24, width=128,
                depth=4, heads=4)
  c.text_decoder.update(width=128, depth=2, heads=4)
  c.image_decoder.update(width=96, depth=2, heads=4)
  return c


def random_captioning_params(model: SyCoCa, seed: int = 0):
  """Random weights for the towers captioning uses (image encoder, text encoder, decoder), without running init.

  Compiling or running `init` takes long on a CPU; shapes come from an abstract init and values from numpy at
  about the scale of the initialisers (norm scales near 1, kernels ~ 1 / sqrt(fan_in)).
  """
  size, length = model.image_encoder.image_size, model.text_encoder.context_length

  def captioning_towers(module, images, text):
    return module.caption_logits(module.encode_image(images)["tokens"], text)

  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, size, size, 3)),
                                             jnp.ones((1, length), jnp.int32), method=captioning_towers))
  rng = np.random.RandomState(seed)
  out = {}
  for path, s in sorted(flax.traverse_util.flatten_dict(shapes["params"]).items()):
    x = np.asarray(rng.standard_normal(s.shape), np.float32)
    if path[-1] == "scale":
      x = 1.0 + 0.1 * x
    elif path[-1] == "bias":
      x = 0.02 * x
    elif len(s.shape) >= 2 and path[-1] != "embedding":
      x = x / np.sqrt(s.shape[0])
    else:
      x = 0.1 * x
    out[path] = jnp.asarray(x)
  return flax.traverse_util.unflatten_dict(out)


def _time(fn, *args, repeats: int) -> tuple[float, float]:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def benchmark(name: str, cfg, batch: int, max_len: int, repeats: int, beam_size: int) -> list[dict]:
  model = build_model(cfg)
  params = random_captioning_params(model)
  size = cfg.vision.image_size
  images = jnp.asarray(np.random.RandomState(1).randn(batch, size, size, 3).astype(np.float32))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=SyCoCa.encode_image)["tokens"])
  image_tokens = jax.block_until_ready(encode(params, images))
  rows = []
  for sampler, kw in (("greedy", {}), ("beam", {"beam_size": beam_size})):
    for cache in (True, False):
      # bos 1, eos 2, pad 0 (eos never chosen: min_len = max_len - 1).
      fn = decoding.build_token_decoder(model, sampler=sampler, bos_id=1, eos_id=2, pad_id=0, max_len=max_len,
                                        cache=cache, min_len=max_len - 1, **kw)
      first, median = _time(fn, params, image_tokens, repeats=repeats)
      rows.append(dict(geometry=name, sampler=sampler if sampler == "greedy" else f"beam {beam_size}",
                       cache="yes" if cache else "no", batch=batch, steps=max_len - 1, first=first, median=median,
                       tokens_per_s=batch * (max_len - 1) / median))
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f"{'geometry':8s} {'sampler':8s} {'cache':5s} {'batch':>5s} {'steps':>5s} {'compile+1st s':>13s} "
          f"{'median s':>9s} {'tokens/s':>9s} {'cache speed-up':>14s}")
  lines = [head, "-" * len(head)]
  for r in rows:
    base = next(o for o in rows if o["geometry"] == r["geometry"] and o["sampler"] == r["sampler"]
                and o["cache"] == "no")
    speedup = f"{base['median'] / r['median']:.1f}x" if r["cache"] == "yes" else ""
    lines.append(f"{r['geometry']:8s} {r['sampler']:8s} {r['cache']:5s} {r['batch']:5d} {r['steps']:5d} "
                 f"{r['first']:13.2f} {r['median']:9.3f} {r['tokens_per_s']:9.1f} {speedup:>14s}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--geometries", default="tiny,base")
  parser.add_argument("--tiny_batch", type=int, default=8)
  parser.add_argument("--tiny_max_len", type=int, default=24)
  parser.add_argument("--base_batch", type=int, default=1)
  parser.add_argument("--base_max_len", type=int, default=16)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  rows = []
  for name in args.geometries.split(","):
    if name == "tiny":
      rows += benchmark("tiny", tiny_config(), args.tiny_batch, args.tiny_max_len, args.repeats, args.beam_size)
    elif name == "base":
      rows += benchmark("base", default_model_config(), args.base_batch, args.base_max_len, args.repeats,
                        args.beam_size)
    else:
      raise ValueError(f"Unknown geometry {name!r}: use tiny, base.")
    print(format_table(rows), flush=True)
    print()
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, float32, random weights")


if __name__ == "__main__":
  main()
