"""sycoca_jax: SyCoCa (Symmetrizing Contrastive Captioners) pretraining and evaluation in JAX/Flax."""
