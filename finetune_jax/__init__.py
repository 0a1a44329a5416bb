"""finetune_jax: scalable fine-tuning of pretrained models in JAX/Flax."""

__version__ = "0.1.0"
