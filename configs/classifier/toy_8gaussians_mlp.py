"""A noise-conditional classifier of the eight-Gaussians component, for classifier guidance on a CPU.

An MLP classifier (``models.classifier.MLPClassifier``) trained by cross-entropy on the eight
Gaussians perturbed by the VP SDE of ``configs/toy/vp_8gaussians.py`` (label: the component). It
guides that unconditional score model to one component:

    python main.py --config configs/classifier/toy_8gaussians_mlp.py --workdir runs/toy_classifier
    python main.py --config configs/toy/vp_8gaussians.py --workdir runs/toy --mode sample \
        --config.sampling.guidance=classifier --config.sampling.classifier_workdir=runs/toy_classifier
"""

from configs import default_toy


def get_config():
  config = default_toy.get_default_configs()
  training = config.training
  training.objective = "classifier"
  training.sde = "vpsde"
  training.n_iters = 2000
  training.snapshot_freq = 1000
  training.snapshot_sampling = False
  training.final_evaluation = False
  config.data.dataset = "8gaussians"

  classifier = config.classifier
  classifier.name = "mlp"
  classifier.hidden_dims = (128, 128)
  classifier.num_classes = 8
  classifier.embedding_size = 32
  classifier.fourier_scale = 1.0
  return config
