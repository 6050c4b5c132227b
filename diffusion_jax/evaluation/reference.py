"""Reference statistics of a data set for FID, sFID and precision/recall, kept in `.npz` files.

Computed once from a data set split (the caller runs the Inception network and
feeds `metrics.GaussianAccumulator`s), saved with `save_reference`, and read back
with `load_reference`, which also reads the files of other evaluators:

* ours: `mu`, `sigma` (pool features), optionally `mu_s`, `sigma_s` (spatial
  features), `features` (pool features of a subset, for precision/recall),
  `arr_0` (uint8 images), `num_images` and `source` (JSON metadata);
* pytorch-fid / TTUR: `mu` and `sigma` alone;
* Dhariwal & Nichol's evaluator (guided-diffusion): `arr_0`, the reference images
  [N, H, W, 3] uint8, with `mu`, `sigma`, `mu_s`, `sigma_s`; precision/recall
  needs the pool features of `arr_0`, which the caller computes from `images`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax import files
from diffusion_jax.evaluation.metrics import GaussianAccumulator

_ARRAY_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "features")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Statistics of a reference set; validated on construction.

  Attributes:
    mu, sigma: mean [D] and covariance [D, D] of the pool features (FID).
    mu_s, sigma_s: mean [S] and covariance [S, S] of the spatial features (sFID), or None.
    features: pool features [M, D] of (a subset of) the set for precision/recall, or None.
    images: uint8 images [M, H, W, C] (an ADM reference batch's `arr_0`), or None.
    num_images: how many images the statistics were computed from, when known.
    source: free-form metadata, e.g. data set and split, the network weights'
      SHA-256, the resize mode; saved as JSON.
    path: the file the statistics were loaded from (None when built in memory); not saved.
  """

  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  features: np.ndarray | None = None
  images: np.ndarray | None = None
  num_images: int | None = None
  source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path: str | None = None

  def __post_init__(self):
    for key in (*_ARRAY_KEYS, "images"):
      if getattr(self, key) is not None:
        object.__setattr__(self, key, np.asarray(getattr(self, key)))
    where = self.name
    _check_gaussian(where, "mu", self.mu, "sigma", self.sigma)
    if (self.mu_s is None) != (self.sigma_s is None):
      raise ValueError(f"{where}: mu_s and sigma_s must be given together.")
    if self.mu_s is not None:
      _check_gaussian(where, "mu_s", self.mu_s, "sigma_s", self.sigma_s)
    if self.features is not None and (
      self.features.ndim != 2 or self.features.shape[1] != self.mu.shape[0]
    ):
      raise ValueError(
        f"{where}: features has shape {self.features.shape}, expected"
        f" [M, {self.mu.shape[0]}] to match mu."
      )
    if self.images is not None and (self.images.ndim != 4 or self.images.dtype != np.uint8):
      raise ValueError(
        f"{where}: images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}."
      )

  @property
  def name(self) -> str:
    """How errors name these statistics: the path, or 'in-memory reference'."""
    return f"reference {self.path}" if self.path else "in-memory reference"

  @classmethod
  def from_accumulators(
    cls,
    pool: GaussianAccumulator,
    spatial: GaussianAccumulator | None = None,
    *,
    features=None,
    source: Mapping[str, Any] | None = None,
  ) -> ReferenceStats:
    """Statistics of the features fed to `pool` (and `spatial`), with optional PR features."""
    mu, sigma = pool.statistics()
    mu_s, sigma_s = spatial.statistics() if spatial is not None else (None, None)
    return cls(
      mu=mu,
      sigma=sigma,
      mu_s=mu_s,
      sigma_s=sigma_s,
      features=None if features is None else np.asarray(features),
      num_images=pool.count,
      source=dict(source or {}),
    )


def _check_gaussian(where: str, mu_key: str, mu, sigma_key: str, sigma):
  if mu.ndim != 1:
    raise ValueError(f"{where}: {mu_key} must be a 1-D array [D], got shape {mu.shape}.")
  dim = mu.shape[0]
  if sigma.shape != (dim, dim):
    raise ValueError(
      f"{where}: {sigma_key} has shape {sigma.shape}, expected"
      f" {(dim, dim)} to match {mu_key} of dimension {dim}."
    )


def check_dimension(stats: ReferenceStats, dim: int, spatial_dim: int | None = None) -> None:
  """Raises one clear ValueError if `stats` do not fit features of `dim` (and `spatial_dim`).

  Call it before comparing: a reference of another network or layer otherwise
  fails deep inside the linear algebra, or not at all.
  """
  if stats.mu.shape[0] != dim:
    raise ValueError(
      f"{stats.name} has {stats.mu.shape[0]}-dim statistics, the features are"
      f" {dim}-dim: was it computed with another network or layer?"
    )
  if spatial_dim is None:
    return
  if stats.mu_s is None:
    raise ValueError(f"{stats.name} has no spatial statistics (mu_s, sigma_s) for sFID.")
  if stats.mu_s.shape[0] != spatial_dim:
    raise ValueError(
      f"{stats.name} has {stats.mu_s.shape[0]}-dim spatial statistics, the"
      f" spatial features are {spatial_dim}-dim."
    )


def save_reference(path: str, stats: ReferenceStats) -> None:
  """Writes `stats` to `path` (.npz, local or gs://) atomically (`files.save_npz`).

  An interrupted save leaves any earlier file at `path` as it was. In a
  multi-host run, call it from one process only.
  """
  arrays = {key: getattr(stats, key) for key in _ARRAY_KEYS if getattr(stats, key) is not None}
  if stats.images is not None:
    arrays["arr_0"] = stats.images  # the ADM evaluator's key, so it reads our files too.
  if stats.num_images is not None:
    arrays["num_images"] = np.int64(stats.num_images)
  arrays["source"] = np.str_(json.dumps(dict(stats.source), sort_keys=True))
  files.save_npz(path, **arrays)


def load_reference(path: str, *, load_images: bool = True) -> ReferenceStats:
  """Reads reference statistics saved by `save_reference`, pytorch-fid or the ADM evaluator.

  Args:
    path: an .npz file (local or gs://).
    load_images: whether to keep an ADM reference batch's `arr_0` images in
      `images` (they can take GBs; the FID statistics do not need them).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not an .npz file, no `mu`/`sigma`, or arrays of the wrong shape;
      the message names the path and the key.
  """
  npz = read_npz(
    path,
    "reference statistics file",
    [*_ARRAY_KEYS, "num_images", "source", *(["arr_0"] if load_images else [])],
  )
  for key in ("mu", "sigma"):
    if key not in npz:
      raise ValueError(f"reference {path} has no {key!r} array (arrays: {sorted(npz)}).")
  arrays = {key: npz[key] for key in _ARRAY_KEYS if key in npz}
  for key in ("mu", "sigma", "mu_s", "sigma_s"):
    if key in arrays:
      arrays[key] = arrays[key].astype(np.float64)
  images = npz.get("arr_0")
  num_images = int(npz["num_images"]) if "num_images" in npz else None
  if num_images is None and images is not None:
    num_images = images.shape[0]
  source = {}
  if "source" in npz:
    try:
      source = json.loads(str(npz["source"]))
    except json.JSONDecodeError as e:
      raise ValueError(f"reference {path}: 'source' is not JSON: {e}") from e
  return ReferenceStats(**arrays, images=images, num_images=num_images, source=source, path=path)


def read_npz(path: str, what: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
  """The arrays of the .npz file `path` (local or gs://; those of `names`, or all).

  Raises:
    FileNotFoundError: no file at `path`, naming `what`.
    ValueError: not an .npz archive (a single .npy array, text, a truncated
      file, a header claiming more than is stored), naming the path.
  """
  if not files.is_file(path):
    raise FileNotFoundError(f"No {what} at {path}.")
  return files.load_npz(path, names)
