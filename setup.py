"""Installs score_sde: score-based generative modelling with SDEs in JAX/Flax."""

import pathlib
import re

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "score_sde" / "__init__.py").read_text()).group(1)

setup(
    name="score_sde",
    version=version,
    description="Score-based generative modelling with stochastic differential equations in JAX/Flax.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["score_sde", "score_sde.*", "configs", "configs.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.0,<0.11",
        "jaxlib>=0.10.0,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml_collections>=1.1,<2",
        "tensorflow-datasets>=4.9.9,<5",
        "grain>=0.2.18,<0.3",
        "numpy>=2.0,<3",
        "absl-py>=2.1,<3",
        "diffrax>=0.7.2,<0.8",
        "equinox>=0.13,<0.14",
        "pillow>=10,<14",
        "scipy>=1.13,<2",
        "scikit-learn>=1.3,<2",
        "tensorboardX>=2.6,<3",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "pytest-xdist>=3.6,<4",
            "nbformat>=5.10,<6",
            "nbclient>=0.10,<0.11",
            "ipykernel>=6.29,<8",
        ],
    },
)
