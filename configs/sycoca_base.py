r"""SyCoCa-Base, the paper's setting (Ma et al., ICML 2024): CoCa-Base towers trained from scratch on CC12M.

  python main.py --config=configs/sycoca_base.py --workdir=gs://BUCKET/sycoca_base
  # ablation rows of the paper: :variant=clip | coca | coca_am | coca_mim_image_only | coca_tgmim_random | sycoca
  # smoke run on the built-in data, anywhere:  --config=configs/sycoca_base.py:runlocal

Geometry (open_clip `coca_base`): ViT-B/18 at 288 px (256 patches), 12 x 768 image and text towers, 12 x 768
multimodal decoder, embed dim 512, context 76, CLIP BPE (49,408). TG-MIM decoder 8 x 512. Loss 1 ITC + 2 IC +
1 TG-MIM, mask ratios 50 / 50 (paper). AdamW (0.9, 0.98, 1e-6), lr 5e-4, wd 0.2, 2k warmup, cosine, bf16
compute, global batch 2048, 20 epochs of CC12M (~10.9M pairs available today -> ~106k steps).

Hardware: TPU v4-64, v5e-64, v5p-32 or v6e-64 (batch 2048 = 64, 32, 128 or 32 per chip), or 32-64 A100/H100 GPUs.
`:slice=v4-64 | v5e-64 | v5p-32 | v6e-64` picks the setting found fastest for that slice (SLICES below); compiled ahead
of time for it, the step leaves 35-47 % of HBM free (README, "Scaling out"). Without `slice=` the v5e-64
setting runs (it also fits v5p-32, not v4-64). Check any other slice first, e.g.
  python -m sycoca_jax.tools.aot --config=configs/sycoca_base.py --topology=v5e-128
On fewer chips, `--config.grad_accum_steps=K` keeps the contrastive negatives of the whole 2048 batch.

Data: CC12M as img2dataset webdataset shards converted to array_record (README: "Preparing CC12M"), pointed to
by --config.data.path='/data/cc12m/*.array_record'.

Expected (paper, zero-shot, CC12M pre-training), COCO R@1 TR / IR: CoCa 16.3 / 15.3, SyCoCa 18.7 / 17.2.
This codebase has not yet been run at this scale; those are the paper's figures, not ours.
"""

from configs import common
from sycoca_jax import config_lib

# The ablation rows `variant=` takes, in table order (python -m sycoca_jax.tools.ablation trains them).
VARIANTS = tuple(common.VARIANTS)

# Per TPU slice, the fastest setting found that fits batch 2048 with at least 15 % of each chip's HBM free, by
# compiling the train step for the slice ahead of time (sycoca_jax/tools/aot.py; the figures and the settings
# tried are in README.md, "Scaling out"). Fastest: fewest FLOPs (remat 'full' costs 24 % more, gradient
# accumulation 14 %, remat 'dots' 1.8 %), then the least HBM traffic. Plain data parallelism, where it fits,
# needs less memory and traffic than FSDP, whose gathered parameters the compiler keeps; FSDP (mesh.data=1,
# mesh.fsdp=-1) is for chips too small for a whole replica of the state. Layers are never scanned here, so every
# slice's checkpoints share one parameter layout (scanned, the towers' layers are stacked on one axis).
DP = dict(data=-1, fsdp=1)
FSDP = dict(data=1, fsdp=-1)
SLICES = {
    "v4-64": dict(mesh=DP, remat=True, remat_policy="dots"),   # no remat: 5.7 % headroom (DP), 6.2 % (FSDP)
    "v5e-64": dict(mesh=FSDP, remat=False, remat_policy="full"),
    "v5p-32": dict(mesh=DP, remat=False, remat_policy="full"),
    "v6e-64": dict(mesh=DP, remat=False, remat_policy="full"),
}
DEFAULT_SLICE = "v5e-64"   # also fits v5p-32; v4-64 needs slice=v4-64


def get_config(arg=None):
  # slice= names the TPU slice to run on (SLICES); the AOT tool checks any other.
  args = common.parse_arg(arg, variant="sycoca", runlocal=False, slice="")
  c = config_lib.default_config()   # the model defaults are CoCa-Base

  c.model.dtype = "bfloat16"
  c.data.update(name="webdataset_array_record", path="/data/cc12m/*.array_record", image_size=288, max_len=76,
                tokenizer="clip_bpe", crop_scale=(0.9, 1.0))
  c.global_batch_size = 2048
  c.num_train_examples = 10_900_000
  c.total_epochs = 20
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6)
  c.log_steps = 100
  c.ckpt_steps = 2000
  c.image_log_steps = 5000
  c.evals = common.default_evals(every=5000)
  for ev in c.evals.values():
    ev.per_device_batch_size = 16  # 1,024 examples per evaluation batch on 64 chips, not 64 (one per chip)

  if args["slice"] and args["slice"] not in SLICES:
    raise ValueError(f"config argument slice={args['slice']!r}: not one of {', '.join(SLICES)}. For another "
                     "slice, check the default with python -m sycoca_jax.tools.aot --topology=... (it names what "
                     "to change).")
  setting = SLICES[args["slice"] or DEFAULT_SLICE]
  c.mesh.update(setting["mesh"])
  c.model.update(remat=setting["remat"], remat_policy=setting["remat_policy"])

  common.apply_variant(c, args.get("variant", "sycoca"))
  if args.get("runlocal"):
    common.runlocal(c)
  return c
