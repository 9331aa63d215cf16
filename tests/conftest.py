"""Test set-up: the CPU convolution option of the entry points (``score_sde.xla_cpu``), before JAX starts."""

from score_sde import xla_cpu

xla_cpu.configure()
