"""Every configuration key of the framework, with its default.

Shipped configs start from ``get_default_configs()`` and override what they need; a key that is not
declared here is an error when overridden from the command line (the config is locked). The names
follow the original implementation's configs, so its files translate directly.
"""

import ml_collections


def get_default_configs() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  # Training.
  config.training = training = ml_collections.ConfigDict()
  training.sde = "vpsde"                    # vpsde | subvpsde | vesde
  training.continuous = True                # continuous-time DSM, or the discrete DDPM/SMLD losses
  training.reduce_mean = False              # mean over dimensions, else 0.5 * sum (the original)
  training.likelihood_weighting = False     # lambda(t) = g(t)^2 (Song et al. 2021b)
  training.importance_weighting = False     # sample t from g^2/sigma^2 (needs likelihood_weighting)
  training.batch_size = 128                 # global batch, over all devices and hosts
  training.n_iters = 1_300_001
  training.n_jitted_steps = 1               # optimiser steps per compiled call (lax.scan)
  training.log_freq = 50
  training.eval_freq = 100
  training.snapshot_freq = 50_000           # regular checkpoints (kept by keep_checkpoints)
  training.snapshot_freq_for_preemption = 10_000
  training.keep_checkpoints = 0             # how many regular checkpoints to keep; 0 keeps all
  training.snapshot_sampling = True         # sample (and plot) at every regular checkpoint
  training.final_evaluation = False         # after training: samples, plots, held-out likelihood
  training.eps = 1e-5                       # smallest time of the continuous losses
  # Class-conditional generation (score_sde.guidance).
  training.objective = "score"              # score | classifier (config.classifier) | dequantizer (config.dequantizer)
  training.label_dropout = 0.0              # P(label -> null class), model.num_classes > 0 (classifier-free guidance)

  # Sampling (score_sde.sampling.get_sampler; builders.SAMPLER_FIELDS maps these fields to each method's
  # options). Fields at 0 or "" keep the method's own default.
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "pc"                    # pc | ode | euler | heun | dpm_solver | dpm_solver++ | unipc
  sampling.batch_size = 64                  # samples per snapshot / per sampling batch
  sampling.eps = 1e-3                       # final time (the original used 1e-3 for VP, 1e-5 for VE)
  sampling.noise_removal = True             # end with Tweedie's denoising step (one more score evaluation)
  # pc: predictor-corrector.
  sampling.predictor = "euler_maruyama"     # euler_maruyama | reverse_diffusion | ancestral_sampling | none
  sampling.corrector = "none"               # langevin | ald | none
  sampling.snr = 0.16
  sampling.n_steps_each = 1                 # corrector steps per predictor step
  sampling.probability_flow = False
  sampling.step_rule = "batch"              # Langevin step size: batch (the original) | per_sample
  sampling.num_steps = 0                    # predictor steps; 0: model.num_scales
  # ode: the adaptive probability-flow ODE solver.
  sampling.rtol = 1e-5
  sampling.atol = 1e-5
  sampling.ode_solver = "tsit5"             # a diffrax solver of sampling.ode.SOLVERS
  # euler, heun, dpm_solver, dpm_solver++, unipc: fixed-budget solvers.
  sampling.nfe = 0                          # score evaluations per sample (0: the method's default)
  sampling.order = 0                        # 0: the method's default
  sampling.time_grid = ""                   # uniform | quadratic | logsnr | karras ("": the method's default)
  sampling.rho = 7.0                        # exponent of the karras grid
  sampling.solver_type = ""                 # dpm_solver, dpm_solver++: midpoint | taylor ("": the method's default)
  sampling.eta = 0.0                        # dpm_solver++: 0 the ODE, 1 the SDE variant
  sampling.lower_order_final = True         # dpm_solver++, unipc: lower orders at the last steps
  sampling.variant = ""                     # unipc: bh1 | bh2 ("": the method's default)
  sampling.unipc_corrector = "unic"         # unipc: unic | trapezoid | none
  sampling.s_churn = 0.0                    # heun: EDM's stochastic churn (0: deterministic)
  sampling.s_tmin = 0.0
  sampling.s_tmax = float("inf")
  sampling.s_noise = 1.0
  # Guided class-conditional sampling (--mode sample; score_sde.guidance).
  sampling.guidance = "none"                # none | classifier | classifier_free
  sampling.guidance_scale = 1.0             # classifier: gamma (1: p(x|y)); classifier_free: w (0: p(x|y))
  sampling.class_labels = ()                # sample i has class class_labels[i % n]; (): class i mod C
  sampling.classifier_workdir = ""          # the run of a training.objective="classifier" config (classifier guidance)

  # Evaluation.
  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.batch_size = 512
  evaluate.enable_loss = True
  evaluate.enable_bpd = False
  evaluate.bpd_dataset = "test"
  evaluate.num_samples = 512
  evaluate.divergence = "rademacher"        # likelihood divergence: exact | rademacher | gaussian
  evaluate.rtol = 1e-5
  evaluate.atol = 1e-5
  evaluate.eps = 1e-5
  evaluate.likelihood_examples = 0          # examples of the likelihood pass (0: the whole split)
  # Likelihood estimates (docs/likelihood.md): each estimator with each dequantiser (8-bit data).
  evaluate.likelihood_estimators = ("ode",)  # ode: PF-ODE log p_eps | bound: the reverse SDE's variational bound
  evaluate.dequantizers = ("uniform",)      # uniform | truncated_normal | variational (eval.dequantizer_workdir)
  evaluate.importance_samples = 1           # K dequantiser samples per image (importance-weighted bound)
  evaluate.bound_time_samples = 1           # time samples per example of the variational bound
  evaluate.bound_decoder = "noisy"          # noisy (bounds p_eps) | tweedie (ScoreFlow's, bounds clean data)
  evaluate.dequantizer_workdir = ""         # the run of a training.objective="dequantizer" config
  evaluate.inception_path = ""              # FID Inception weights .npz (see score_sde/models/inception.py)
  # --mode eval over checkpoints n = begin_ckpt..end_ckpt (step n * training.snapshot_freq).
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 0                     # 0: every regular checkpoint present when the evaluation starts
  evaluate.wait_timeout = 0                 # seconds to wait for a checkpoint not written yet (0: do not wait)
  evaluate.bpd_repeats = 1                  # bits/dim passes, each with fresh dequantisation noise
  evaluate.enable_sampling = False          # samples and their quality (eval.feature_network)
  evaluate.feature_network = ""             # "": by data set. inception: FID / KID / IS (inception_path,
                                            # fid_stats_path); digits: FD / KID of a digits classifier's features
                                            # and class accuracy; points (2-D sets): energy distance, sample log p
  evaluate.fid_stats_path = ""              # reference statistics (--mode fid_stats writes them)
  evaluate.inception_size = 299             # images are resized to this for the Inception network
  evaluate.kid_subsets = 100
  evaluate.kid_subset_size = 1000
  # Sampler sweeps: entries "method[:field=value,...]" overriding config.sampling, e.g.
  # ("pc", "ode", "dpm_solver++:nfe=10,order=2", "unipc:nfe=10"); (): the config's own sampler.
  evaluate.samplers = ()

  # Data.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "CIFAR10"
  data.image_size = 32
  data.num_channels = 3
  data.random_flip = True
  data.centered = False                     # scale to [-1, 1] instead of [0, 1]
  data.uniform_dequantization = False
  data.data_dir = ""                        # TFDS data directory ("" uses TFDS's default)
  data.num_train = 0                        # toy data: number of training points (0: the default)
  data.test_fraction = 0.0                  # image folders without test/: the fraction held out (0: none)
  # Input pipeline (experiments/README.md "Input pipeline"): batches are read and prepared by num_workers
  # grain worker processes, one batch at a time each, or with num_workers = 0 by num_threads threads of the
  # training process.
  data.num_workers = 0
  data.num_threads = 4

  # Model.
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"
  model.sigma_min = 0.01
  model.sigma_max = 50.0
  model.num_scales = 1000
  model.beta_min = 0.1
  model.beta_max = 20.0
  model.discretization = "grid"             # grid | table (the original's DDPM/SMLD tables)
  model.ema_rate = 0.999
  model.ema_warmup = False
  model.dropout = 0.1
  model.nf = 64
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (8,)
  model.embedding_type = "fourier"          # fourier | positional
  model.fourier_scale = 16.0
  model.scale_by_sigma = False
  model.conditional = True
  model.hidden_dims = (256, 256, 256)       # mlp
  # ncsnpp (NCSN++ / DDPM++) and ddpm; defaults are NCSN++'s CIFAR-10 settings (the original's
  # configs set every one of them; DDPM++ uses fir=False, progressive_input="none").
  model.resamp_with_conv = True             # learned convs in Upsample / Downsample (else copies / pooling)
  model.fir = True                          # ncsnpp: FIR resampling (StyleGAN2) instead of copies / pooling
  model.fir_kernel = (1, 3, 3, 1)           # ncsnpp: the FIR filter
  model.skip_rescale = True                 # ncsnpp: divide residual sums by sqrt(2)
  model.resblock_type = "biggan"            # ncsnpp: biggan (resampling blocks) | ddpm
  model.progressive = "none"                # ncsnpp output path: none | output_skip | residual
  model.progressive_input = "residual"      # ncsnpp input path: none | input_skip | residual
  model.progressive_combine = "sum"         # ncsnpp input_skip merge: sum | cat
  model.init_scale = 0.0                    # ncsnpp: init scale of each residual branch's last layer (0: ~zero)
  model.normalization = "InstanceNorm++"    # ncsn*: InstanceNorm++ | InstanceNorm | VarianceNorm | GroupNorm
  model.nonlinearity = "swish"              # swish | elu | relu | lrelu (NCSN configs: elu)
  model.interpolation = "bilinear"          # ncsn*: bilinear | bilinear_align_corners | nearest_neighbor
  model.num_classes = 0                     # mlp, unet: classes (0: unconditional); ncsn: noise levels (0: num_scales)
  model.remat = False                       # ncsnpp, ddpm, unet, ncsn*: recompute block activations on the backward pass
  model.dtype = "float32"                   # ncsnpp, ddpm, unet, ncsn*: compute dtype float32 | bfloat16 (float32 parameters)

  # Noise-conditional classifier of class-conditional sampling (models.classifier.get_classifier).
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.name = "wideresnet"            # wideresnet (images) | mlp (vectors)
  classifier.depth = 28                     # 6 n + 4 (n blocks per group); WRN-28-10 is the original's
  classifier.widen_factor = 10              # models.classifier.small_wide_resnet: depth 10, width 2, 32 freqs
  classifier.num_classes = 10
  classifier.embedding_size = 128           # Fourier frequencies of log sigma; the embedding MLP is 4x wider
  classifier.fourier_scale = 16.0
  classifier.input_mean = ()                # per-channel input normalisation; () for none
  classifier.input_std = ()                 # (the original used models.classifier.CIFAR10_MEAN / _STD)
  classifier.hidden_dims = (128, 128)       # mlp (classifier of vectors): widths of its residual blocks

  # Variational dequantiser q(u | x) (training.objective = "dequantizer"; models.dequantizer), trained on the
  # variational bound of the frozen score model of score_workdir.
  config.dequantizer = dequantizer = ml_collections.ConfigDict()
  dequantizer.score_workdir = ""            # the score model's run (its config.json and newest checkpoint)
  dequantizer.features = 32                 # conditioner width
  dequantizer.num_steps = 2                 # flow steps (elementwise affine + affine coupling each)
  dequantizer.time_samples = 1              # time samples of the bound per example in the training loss

  # Optimisation.
  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "Adam"
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 0.0
  optim.warmup = 5000
  optim.grad_clip = 1.0

  # Scale-out and fault tolerance (training.*; README "Launching on many devices and hosts").
  training.fsdp = 1                         # parameter sharding: mesh (devices / fsdp, fsdp); 1 = pure data parallel
  training.nonfinite = "stop"               # non-finite loss or gradient: stop | skip (drop that update)
  training.max_skipped = 100                # with skip: stop after more than this many skipped steps in a row

  # Profiling (README "Profiling"): a jax.profiler trace into <workdir>/tensorboard/plugins/profile/.
  training.profile_steps = 0                # steps to trace (rounded up to whole compiled calls); 0: no trace
  training.profile_start = 0                # trace the steps after this one; 0: after this launch's first call

  return config
