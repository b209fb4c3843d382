"""moejax: Mixture-of-Experts Transformer language models in JAX/Flax."""
__version__ = '0.1.0'
