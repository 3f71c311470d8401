"""mnemax: pretraining efficient LLMs in JAX."""
