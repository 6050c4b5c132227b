"""Makes tests/data/edm/references.npz by running NVlabs/edm's own code (not part of the tests).

    git clone https://github.com/NVlabs/edm /tmp/edm
    git -C /tmp/edm checkout 008a4e5316c8e3bfe61a62f874bddba254295afb
    python tests/data/edm/make_references.py --edm_dir=/tmp/edm

Needs torch (CPU) and NumPy only. Runs, in float32/float64 as the original does:
  * EDMPrecond, VPPrecond and iDDPMPrecond (training/networks.py) around a fixed
    analytic network F(x_in, c_noise) = tanh(x_in) (1 + c_noise / 10) + c_noise / 20
    (iDDPMPrecond's second C channels, its variance, are 7);
  * EDMLoss (training/loss.py) with the normals it draws replaced by saved ones;
  * edm_sampler (generate.py) on the exact denoiser of a Gaussian mixture
    (every pixel independently from MIXTURE below), deterministic and stochastic
    with saved noise, and on iDDPMPrecond(F) (sigma rounded to its grid).
tests/test_edm.py computes the same with diffusion_jax and compares within 1e-5.
Arrays are NCHW here, as in the original; the test transposes them.
"""

import argparse
import contextlib
import math
import os
import sys

import numpy as np
import torch

MIXTURE = dict(weights=(0.3, 0.7), means=(-0.6, 0.4), stds=(0.15, 0.25))
CHURN = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)  # EDM's ImageNet-64 setting
SIGMAS = (0.01, 0.3, 2.0, 40.0)


class AnalyticNet(torch.nn.Module):
  """F(x_in, c_noise) = tanh(x_in) (1 + c_noise / 10) + c_noise / 20, out_channels/in_channels copies
  of it followed by 7s (the variance channels of a learned-variance model)."""

  def __init__(self, in_channels, out_channels, **unused):
    super().__init__()
    self.extra = out_channels - in_channels

  def forward(self, x, noise_labels, class_labels=None, **unused):
    c = noise_labels.to(torch.float32).reshape(-1, 1, 1, 1)
    f = torch.tanh(x) * (1 + c / 10) + c / 20
    return torch.cat([f, torch.full_like(x[:, :self.extra], 7.0)], dim=1) if self.extra else f


class MixtureDenoiser(torch.nn.Module):
  """The exact E[y | y + sigma n] of pixels drawn independently from MIXTURE, in float64."""

  sigma_min, sigma_max = 0.0, float("inf")

  def round_sigma(self, sigma):
    return torch.as_tensor(sigma)

  def forward(self, x, sigma, class_labels=None):
    x = x.to(torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    logits, means = [], []
    for w, mu, s in zip(*MIXTURE.values()):
      var = s * s + sigma * sigma
      logits.append(math.log(w) - 0.5 * torch.log(2 * math.pi * var) - (x - mu) ** 2 / (2 * var))
      means.append(mu + s * s / var * (x - mu))
    resp = torch.softmax(torch.stack(logits), dim=0)
    return (resp * torch.stack(means)).sum(0)


def float64_grid(iddpm):
  """iDDPMPrecond's u from its own recursion in float64 (stored float32): the original runs it in
  float32, which cancels at small sigma (5e-4 relative at u[M-1]); the sampler case compares
  rounding and sampling, not that cancellation (iddpm_u keeps the original grid)."""
  u = np.zeros(iddpm.M + 1)
  alpha_bar = lambda j: math.sin(0.5 * math.pi * j / iddpm.M / (iddpm.C_2 + 1)) ** 2
  for j in range(iddpm.M, 0, -1):
    u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), iddpm.C_1) - 1)
  return torch.from_numpy(u.astype(np.float32))


@contextlib.contextmanager
def replaced(module, **values):
  old = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in old.items():
      setattr(module, name, value)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--edm_dir", required=True, help="NVlabs/edm checkout at the pinned commit")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "references.npz"))
  args = parser.parse_args()
  sys.path.insert(0, args.edm_dir)
  from training import loss as edm_loss, networks  # pylint: disable=import-outside-toplevel
  import generate  # pylint: disable=import-outside-toplevel

  networks.AnalyticNet = AnalyticNet  # found by model_type through the module's globals()
  rng = np.random.default_rng(0)
  out = {}

  # Preconditioners on 4 images of 2 x 3 x 3 at four noise levels.
  x = rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * np.array(SIGMAS, np.float32)[:, None, None, None]
  sigma = torch.tensor(SIGMAS, dtype=torch.float32)
  out.update(precond_x=x, precond_sigma=np.array(SIGMAS, np.float32))
  for name, cls in (("edm", networks.EDMPrecond), ("vp", networks.VPPrecond),
                    ("iddpm", networks.iDDPMPrecond)):
    net = cls(img_resolution=3, img_channels=2, model_type="AnalyticNet")
    with torch.no_grad():
      out[f"precond_{name}"] = net(torch.from_numpy(x), sigma).numpy()
  iddpm = networks.iDDPMPrecond(img_resolution=3, img_channels=2, model_type="AnalyticNet")
  out["iddpm_u"] = iddpm.u.numpy()  # its sigma grid, u[j] for timestep M - 1 - j

  # EDMLoss with saved normals: rnd_normal [B, 1, 1, 1] for sigma, then n [B, C, H, W].
  images = np.clip(rng.standard_normal((4, 2, 3, 3)) * 0.5, -1, 1).astype(np.float32)
  normals = [rng.standard_normal((4, 1, 1, 1)).astype(np.float32),
             rng.standard_normal((4, 2, 3, 3)).astype(np.float32)]
  draws = iter(torch.from_numpy(n) for n in normals)
  net = networks.EDMPrecond(img_resolution=3, img_channels=2, model_type="AnalyticNet")
  with replaced(torch, randn=lambda *a, **k: next(draws), randn_like=lambda *a, **k: next(draws)):
    out["loss"] = edm_loss.EDMLoss()(net, torch.from_numpy(images)).detach().numpy()
  out.update(loss_images=images, loss_rnd_normal=normals[0], loss_noise=normals[1])

  # edm_sampler: latents [8, 1, 2, 2], per-step noise [N, 8, 1, 2, 2].
  for name, (network, num_steps, churn) in {
      "mixture": (MixtureDenoiser(), 18, {}),
      "mixture_churn": (MixtureDenoiser(), 18, CHURN),
      "iddpm": (iddpm, 10, {}),
  }.items():
    latents = rng.standard_normal((8, 1, 2, 2))
    noise = rng.standard_normal((num_steps, 8, 1, 2, 2))
    steps = iter(torch.from_numpy(n) for n in noise)
    if name == "iddpm":
      network = networks.iDDPMPrecond(img_resolution=2, img_channels=1, model_type="AnalyticNet")
      network.u = float64_grid(network)
    with torch.no_grad():
      result = generate.edm_sampler(network, torch.from_numpy(latents),
                                    randn_like=lambda x: next(steps), num_steps=num_steps, **churn)
    out.update({f"sampler_{name}": result.numpy(), f"sampler_{name}_latents": latents,
                f"sampler_{name}_noise": noise})
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in sorted(out.items())))


if __name__ == "__main__":
  main()
