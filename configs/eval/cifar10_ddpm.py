"""Ho et al. 2020 (DDPM), CIFAR-10: FID and IS of 50,000 samples, NLL on the test set.

    python -m launch.evaluate --config=configs/eval/cifar10_ddpm.py --workdir=$WORKDIR \
        --config.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth

The paper's protocol (sec. 4, Table 1: FID 3.17, IS 9.46, NLL <= 3.75 bits/dim
for L_simple): 50,000 samples from the EMA parameters with the ancestral
sampler over all 1000 steps (sigma_t^2 = beta_t), FID against the statistics
of the 50,000 training images, IS with 10 splits on TF's Inception graph (our
"tf" input mode reproduces its resize), and the full variational bound on the
10,000 test images, the model's own bound (no clipping of x_0). `nll_ode` is
the exact likelihood through the probability-flow ODE with score_sde's
protocol (Song et al. 2021, sec. 4.3; its likelihood.py and run_lib.py):
uniform dequantisation, one Rademacher probe per image, RK45 with rtol = atol
= 1e-5 from t = 1e-5, batches of 1024, 5 passes over the test set.
"""

import ml_collections

from diffusion_jax.config.evaluation import complete_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "cifar10_ddpm"  # the report goes to WORKDIR/eval/cifar10_ddpm-step<N>/
  config.metrics = ("fid", "is", "nll", "nll_ode")
  config.samplers = (dict(sampler="ddpm", steps=0),)  # ancestral, all T steps
  config.num_samples = 50_000
  config.batch_size = 500  # images per sampling batch, over all devices
  config.seed = 0
  config.checkpoint_step = -1  # the latest
  config.data = dict(source="tfds", name="cifar10", image_size=32, num_channels=3, num_threads=4)
  config.reference_split = "train"  # FID against the training set, as the paper
  config.reference_path = ""  # or pytorch-fid's / the ADM evaluator's .npz
  config.real_floor = False  # True: also score the test images (FID test vs train)
  config.nll = dict(split="test", num_examples=0, batch_size=500, clip_x0=False)
  config.nll_ode = dict(
    split="test",
    num_examples=0,
    batch_size=1024,
    solver="dopri5",
    rtol=1e-5,
    atol=1e-5,
    divergence="hutchinson",
    probe="rademacher",
    probes=1,
    dequantisation="uniform",
    t_min=1e-5,
    repeats=5,
  )
  config.inception_weights = ""  # default $DIFFUSION_JAX_INCEPTION_WEIGHTS
  config.inception_sha256_prefix = "6726825d"  # the published file's
  config.resize = "tf"  # the published numbers' resize
  config.is_splits = 10
  config.pr_k = 3
  config.feature_batch_size = 200
  return complete_config(config)  # every other field at its default
