"""score_sde: score-based generative modelling with stochastic differential equations in JAX."""

from score_sde import xla_cpu as _xla_cpu

# Before JAX starts a backend: XLA's own convolutions on the CPU (see score_sde/xla_cpu.py).
_xla_cpu.configure()

__version__ = "0.1.0"
