"""Samplers of the reverse process, each one compiled loop; see docs/sampling.md.
Typical use:

    steps = sampling.respaced(schedule, 50)            # or the plain schedule: all T steps
    images = sampling.ddim_sample(model_fn, spec, steps, key, (16, 32, 32, 3), eta=0.0)
    denoiser = sampling.denoisers.from_discrete(model_fn, spec, schedule)  # D(x; sigma)
    images = sampling.edm_sample(denoiser, key, (16, 32, 32, 3), num_steps=18)
"""

from diffusion_jax.sampling import denoisers
from diffusion_jax.sampling.denoisers import Denoiser
from diffusion_jax.sampling.edm_sampler import edm_heun_sample, edm_sample
from diffusion_jax.sampling.generate import (
  SamplerConfig,
  grid_labels,
  make_batch_sampler,
  sample_to_files,
)
from diffusion_jax.sampling.guidance import classifier_free_guidance
from diffusion_jax.sampling.loop import SamplingSchedule, Trajectory, logsnr_respaced, respaced
from diffusion_jax.sampling.samplers import (
  SAMPLERS,
  ddim_invert,
  ddim_sample,
  ddpm_sample,
  dpm_solver_sample,
  get_sampler,
)

__all__ = [
  "Denoiser",
  "SAMPLERS",
  "SamplerConfig",
  "SamplingSchedule",
  "Trajectory",
  "classifier_free_guidance",
  "ddim_invert",
  "ddim_sample",
  "ddpm_sample",
  "denoisers",
  "dpm_solver_sample",
  "edm_heun_sample",
  "edm_sample",
  "get_sampler",
  "grid_labels",
  "logsnr_respaced",
  "make_batch_sampler",
  "respaced",
  "sample_to_files",
]
