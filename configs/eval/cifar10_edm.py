"""Karras et al. 2022 (EDM), CIFAR-10: FID of 50,000 samples with the EDM sampler (35 NFE).

    python -m launch.evaluate --config=configs/eval/cifar10_edm.py --workdir=$WORKDIR \
        --config.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth

EDM's protocol (sec. 5, App. F.1; its fid.py): 50,000 samples of
Algorithm 2 at 18 noise levels, deterministic (35 network evaluations), FID
against the 50,000 training images on the Inception network of the TF
release; EDM reports the minimum over three runs of 50k samples with
different seeds (and their mean in its code's logs): `seeds` draws all
three, and the report (WORKDIR/eval/cifar10_edm-step<N>/) gives each FID
and their minimum and mean (`over_seeds`). Each draw resumes on its own.
No NLL: an EDM network has no DDPM variational bound.
"""

import ml_collections

from diffusion_jax.config.evaluation import complete_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "cifar10_edm"  # the report goes to WORKDIR/eval/cifar10_edm-step<N>/
  config.metrics = ("fid",)
  config.samplers = (dict(sampler="edm_heun", steps=18),)  # 2 * 18 - 1 = 35 network calls
  config.num_samples = 50_000
  config.batch_size = 500  # images per sampling batch, over all devices
  config.seeds = (0, 1, 2)  # EDM: the minimum (and mean) over three draws of 50k
  config.checkpoint_step = -1  # the latest
  config.data = dict(source="tfds", name="cifar10", image_size=32, num_channels=3, num_threads=4)
  config.reference_split = "train"
  config.reference_path = ""  # or pytorch-fid's / EDM's cifar10-32x32.npz statistics
  config.inception_weights = ""  # default $DIFFUSION_JAX_INCEPTION_WEIGHTS
  config.inception_sha256_prefix = "6726825d"
  config.resize = "tf"
  config.feature_batch_size = 200
  return complete_config(config)  # every other field at its default
