"""score_sde: score-based generative modelling with stochastic differential equations in JAX.

Importing the package changes nothing in the process. On CPUs, entry points call
``score_sde.xla_cpu.configure()`` before JAX runs anything (``main.py``, the notebooks, the tests).
"""

__version__ = "0.1.0"
