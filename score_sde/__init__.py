"""score_sde: score-based generative modelling with stochastic differential equations in JAX."""

__version__ = "0.1.0"
