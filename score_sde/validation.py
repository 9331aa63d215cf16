"""Checks a configuration when it is loaded, so a typo fails in a second, not after compiling.

Every name-valued field is checked against the literal name table it is looked up in, and each
error says which field to change, the valid choices, and the command-line flag that sets it.
"""

from __future__ import annotations

from typing import Iterable

import ml_collections

from score_sde import datasets
from score_sde import guidance
from score_sde import likelihood
from score_sde import losses
from score_sde import models
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde import train
from score_sde.sampling import correctors

_OPTIMIZERS = ("adam", "adamw")
_DISCRETIZATIONS = ("grid", "table")


def _choice(field: str, value, valid: Iterable[str], lower: bool = False) -> None:
  valid = sorted(valid)
  if (value.lower() if lower and isinstance(value, str) else value) not in valid:
    raise ValueError(f"config.{field}={value!r} is not one of {valid}; set it with "
                     f"--config.{field}=<{'|'.join(valid)}>.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field, the valid choices and the flag, for a bad config."""
  training, model, data, sample, evaluate = (config.training, config.model, config.data, config.sampling,
                                             config.eval)
  _choice("training.sde", training.sde, sde_lib.SDES, lower=True)
  _choice("model.name", model.name, models.MODELS)
  _choice("model.discretization", model.discretization, _DISCRETIZATIONS)
  _choice("data.dataset", data.dataset, list(datasets.TOY_DATASETS) + list(datasets.IMAGE_DATASETS),
          lower=True)
  _choice("sampling.method", sample.method, sampling.METHODS)
  _choice("sampling.predictor", sample.predictor, sampling.PREDICTORS)
  _choice("sampling.corrector", sample.corrector, sampling.CORRECTORS)
  _choice("sampling.step_rule", sample.step_rule, correctors.STEP_RULES)
  _choice("eval.divergence", evaluate.divergence, likelihood.DIVERGENCES)
  _choice("optim.optimizer", config.optim.optimizer, _OPTIMIZERS, lower=True)
  _choice("training.nonfinite", training.nonfinite, losses.NONFINITE_POLICIES)
  _choice("training.objective", training.objective, train.OBJECTIVES)
  _choice("sampling.guidance", sample.guidance, guidance.GUIDANCES)
  if not 0.0 <= training.label_dropout <= 1.0:
    raise ValueError(f"config.training.label_dropout={training.label_dropout} is a probability; set "
                     f"--config.training.label_dropout to a value in [0, 1] (0.1-0.2 for classifier-free guidance).")
  if training.objective == "score":
    guidance.check_config(config, models.get_model(config))

  if not training.continuous and training.sde.lower() == "subvpsde":
    raise ValueError("Discrete training (config.training.continuous=False) exists for vpsde (DDPM loss) and "
                     "vesde (SMLD loss) only; set --config.training.continuous=True for subvpsde.")
  if training.likelihood_weighting and not training.continuous:
    raise ValueError("config.training.likelihood_weighting needs continuous training; set "
                     "--config.training.continuous=True or --config.training.likelihood_weighting=False.")
  if training.importance_weighting and not training.likelihood_weighting:
    raise ValueError("config.training.importance_weighting samples t for the likelihood weighting; set "
                     "--config.training.likelihood_weighting=True as well, or turn it off.")
  if sample.predictor == "none" and sample.corrector == "none" and sample.method == "pc":
    raise ValueError("config.sampling.predictor and config.sampling.corrector are both 'none'; choose at "
                     f"least one of {sorted(sampling.PREDICTORS)} / {sorted(sampling.CORRECTORS)}.")
  if int(training.max_skipped) != training.max_skipped or training.max_skipped < 0:
    raise ValueError(f"config.training.max_skipped must be a non-negative integer, got {training.max_skipped}.")
  for field in ("batch_size", "n_iters", "n_jitted_steps", "fsdp"):
    if int(training[field]) < 1:
      raise ValueError(f"config.training.{field} must be a positive integer, got {training[field]}.")
  for field in ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
    value = int(training[field])
    if value < 1 or value % training.n_jitted_steps:
      raise ValueError(
          f"config.training.{field}={value} must be a positive multiple of config.training.n_jitted_steps="
          f"{training.n_jitted_steps} (steps run {training.n_jitted_steps} at a time); e.g. --config.training."
          f"{field}={max(training.n_jitted_steps, value // training.n_jitted_steps * training.n_jitted_steps)}.")
