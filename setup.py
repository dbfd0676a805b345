"""sycoca_jax: Symmetrizing Contrastive Captioners in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6,<0.11",
    "flax>=0.10,<0.13",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "etils[epath]>=1.7",      # workdir paths, local or gs:// (sycoca_jax.paths); orbax reads them the same way
    # orbax asks Cloud Storage whether a gs:// checkpoint bucket has a hierarchical namespace before listing it.
    "google-cloud-storage>=2.14",
    "ml-collections>=1.0",
    "einops>=0.8",
    "clu>=0.0.12",
    # tfds' TFRecord readers and clu's TensorBoard writer (gs:// workdirs only) import TensorFlow; the CPU build
    # is enough.
    "tensorflow-cpu>=2.16",
    # Local runs write TensorBoard events from its protocol buffers, without TensorFlow (sycoca_jax/metrics.py).
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9.6",
    "grain>=0.2.6",           # random-access, checkpointable input pipelines
    "array-record>=0.5",      # the on-disk format grain reads for web-scale image-text data
    "numpy>=1.26",
    "pillow>=10",
    "tokenizers>=0.19",       # fast, exact CLIP BPE
    "ftfy>=6",                # CLIP's text clean-up before BPE
    "regex>=2023",
    "scikit-learn>=1.4",      # real offline eval sets (digits) and linear probes
    "scikit-image>=0.22",     # photos and textures shipped in the wheel, lfw_subset
    "safetensors>=0.4",       # reading open_clip checkpoints without pickle
    "absl-py>=2",
    # The evaluators the default run reports: caption metrics (BLEU / METEOR / ROUGE-L / CIDEr-D) and an
    # offline VQA set that ships inside its wheel.
    "pycocoevalcap>=1.2",
    "easy-vqa>=1.0",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3", "sentencepiece>=0.2", "matplotlib>=3.8"],
    # The ablation study's chart (python -m sycoca_jax.tools.ablation); without it only the tables are written.
    "ablation": ["matplotlib>=3.8"],
    # The Colab notebooks (notebooks/) and tests/test_notebooks.py, which executes them.
    "notebooks": ["matplotlib>=3.8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    # Only needed to import open_clip weights from .pt/.bin files and for the parity tests.
    "torch": ["torch>=2.4", "open-clip-torch>=2.26"],
    # libtpu, the TPU compiler, matched to jax: sycoca_jax.tools.aot compiles the train step for a TPU slice on any
    # machine. Without a TPU attached, jax still runs on the CPU.
    "tpu": ["jax[tpu]>=0.6,<0.11"],
    # jax's CUDA plugin (XLA:GPU) matched to jax, without CUDA's libraries: sycoca_jax.tools.aot compiles the train
    # step for NVIDIA GPUs (--topology=h100-8) on any Linux x86 machine. About 180 MB to download, 480 MB installed.
    "gpu_aot": ["jax[cuda12-local]>=0.6,<0.11"],
}

setuptools.setup(
    name="sycoca_jax",
    version="0.1.0",
    description="SyCoCa (Symmetrizing Contrastive Captioners) pretraining and evaluation in JAX/Flax.",
    packages=setuptools.find_packages(include=["sycoca_jax", "sycoca_jax.*"]),
    package_data={"sycoca_jax": ["data/assets/*", "convert/*.json", "convert/OPEN_CLIP_LICENSE.txt"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
