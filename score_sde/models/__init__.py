"""Score networks by name, built from a config.

    model = models.get_model(config)          # a flax.linen.Module
    out = model.apply(variables, x, labels, train=False)   # shaped like x

Every network takes x (B, ...) (NHWC for images, (B, D) for vectors) and float labels (B,), and
returns an array shaped like x; ``train=True`` enables dropout (pass ``rngs={"dropout": key}``).
What the labels mean and how the output becomes a score is ``models.wrapper``'s business.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections

from score_sde.models import ddpm, mlp, ncsnpp, ncsnv2, unet

# Networks by ``config.model.name``.
MODELS: dict[str, type[nn.Module]] = {
    "ddpm": ddpm.DDPM,
    "mlp": mlp.MLP,
    "ncsn": ncsnv2.NCSN,
    "ncsnv2_64": ncsnv2.NCSNv2,
    "ncsnv2_128": ncsnv2.NCSNv2_128,
    "ncsnv2_256": ncsnv2.NCSNv2_256,
    "ncsnpp": ncsnpp.NCSNpp,
    "unet": unet.UNet,
}

# Constructor arguments taken from config sections other than ``config.model``.
_OTHER_SECTIONS = {"centered": "data", "continuous": "training"}
# Memory and speed options (``config.model.remat``, ``config.model.dtype``) and their "off" values:
# a network without the option refuses any other value rather than ignoring it.
_OPTIONS = {"remat": False, "dtype": "float32"}


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the network named ``config.model.name``.

  The config stops here: every constructor argument of the network that has a key of the same
  name in ``config.model`` (or, for ``centered``, in ``config.data``, and for ``continuous``, in
  ``config.training``) is passed explicitly; arguments without a key keep the network's default.
  Sequences become tuples, so the module hashes (score functions use it as a static argument of
  jitted samplers).

  Raises:
    ValueError: for an unknown name, or a memory / speed option (``remat``, ``dtype``) turned on
      for a network that does not offer it.
  """
  name = config.model.name.lower()
  if name not in MODELS:
    raise ValueError(f"Unknown model {config.model.name!r}; valid choices: {sorted(MODELS)}. Set "
                     f"config.model.name to one of them.")
  cls = MODELS[name]
  names = {field.name for field in dataclasses.fields(cls)}
  for option, off in _OPTIONS.items():
    if option not in names and config.model.get(option, off) != off:
      raise ValueError(f"The {name} network has no {option} option; set config.model.{option} = {off!r}.")
  kwargs = {}
  for field in dataclasses.fields(cls):
    section = config.get(_OTHER_SECTIONS.get(field.name, "model"), {})
    if field.name not in ("parent", "name") and field.name in section:
      value = section[field.name]
      kwargs[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
  return cls(**kwargs)


__all__ = ["MODELS", "get_model"]
