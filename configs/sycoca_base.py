r"""SyCoCa-Base, the paper's setting (Ma et al., ICML 2024): CoCa-Base towers trained from scratch on CC12M.

  python main.py --config=configs/sycoca_base.py --workdir=gs://BUCKET/sycoca_base
  # ablation rows of the paper: :variant=clip | coca | coca_am | coca_mim_image_only | coca_tgmim_random | sycoca
  # smoke run on the built-in data, anywhere:  --config=configs/sycoca_base.py:runlocal

Geometry (open_clip `coca_base`): ViT-B/18 at 288 px (256 patches), 12 x 768 image and text towers, 12 x 768
multimodal decoder, embed dim 512, context 76, CLIP BPE (49,408). TG-MIM decoder 8 x 512. Loss 1 ITC + 2 IC +
1 TG-MIM, mask ratios 50 / 50 (paper). AdamW (0.9, 0.98, 1e-6), lr 5e-4, wd 0.2, 2k warmup, cosine, bf16
compute, global batch 2048, 20 epochs of CC12M (~10.9M pairs available today -> ~106k steps).

Hardware: sized for a TPU v4-64 / v5e-64 pod slice or 32-64 A100/H100 GPUs (batch 2048 = 32-64 per chip);
use `--config.mesh.fsdp=N` to split parameters and optimizer state when memory is tight, and
`--config.grad_accum_steps=K` on fewer chips (contrastive negatives still span the 2048 batch).

Data: CC12M as img2dataset webdataset shards converted to array_record (README: "Preparing CC12M"), pointed to
by --config.data.path='/data/cc12m/*.array_record'.

Expected (paper, zero-shot, CC12M pre-training), COCO R@1 TR / IR: CoCa 16.3 / 15.3, SyCoCa 18.7 / 17.2.
This codebase has not yet been run at this scale; those are the paper's figures, not ours.
"""

from sycoca_jax import config_lib


def get_config(arg=None):
  # slice= names the TPU slice the AOT tool compiles for (sycoca_jax/tools/aot.py).
  args = config_lib.parse_arg(arg, variant="sycoca", runlocal=False, slice="")
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
  c.evals = config_lib.default_evals(every=5000)

  config_lib.apply_variant(c, args.get("variant", "sycoca"))
  if args.get("runlocal"):
    config_lib.runlocal(c)
  return c
