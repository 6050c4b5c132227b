"""NLL in bits/dim through the probability-flow ODE (Song et al. 2021), sharded, resumable.

`ode_likelihood.log_likelihood` of every example of a split, its batch split
over the devices of every process, solved on the devices in one compiled
loop per batch whose step size sees the error of the whole global batch
(padding left out), so every device and process takes the same steps.
Example i dequantises and draws its Hutchinson probes from fold_in(key, i),
i its position in the split. Batches are saved and resumed as the bound's
(`nll.run_batches`); each repeat (score_sde's protocol goes over the test
set 5 times) has its own key and folder.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import files, ode, parallel
from diffusion_jax import ode_likelihood as odl
from diffusion_jax.config.evaluation import NllOdeConfig
from diffusion_jax.evaluation import nll
from diffusion_jax.runs import EmaModel

PARTS = ("bpd", "nll_nats", "nfe", "accepted", "rejected")


def solver_config(config: NllOdeConfig) -> ode.SolverConfig:
  return ode.SolverConfig(
    method=config.solver,
    rtol=config.rtol,
    atol=config.atol,
    steps=config.steps,
    max_steps=config.max_steps,
  )


def divergence_config(config: NllOdeConfig) -> odl.DivergenceConfig:
  return odl.DivergenceConfig(
    divergence=config.divergence, probe=config.probe, probes=config.probes
  )


def check_model(model: EmaModel) -> None:
  """Raises ValueError if the model's schedule has no VP SDE (`ode_likelihood.vp_sde_of`)."""
  odl.vp_sde_of(model.schedule)


def make_nll_ode_fn(model: EmaModel, config: NllOdeConfig):
  """A pure `(params, images [B, H, W, C], labels [B], index [B], key) -> {part: [B]}`.

  bpd: -log p(x~) / (D ln 2) + the dequantisation's offset, x~ example b's
  dequantised image; nll_nats: -log p(x~); nfe, accepted, rejected: the
  batch's solver counters, the same for every example (evaluations of the
  ODE's right-hand side: each is one network call and its divergence).
  """
  sde = odl.vp_sde_of(model.schedule, t_min=config.t_min)
  divergence, solver = divergence_config(config), solver_config(config)
  dims = math.prod(model.image_shape)

  def nll_ode_fn(params, images, labels, index, key):
    y = None if model.num_classes is None else labels
    score = odl.score_from_model(lambda x, t: model.apply_fn(params, x, t, y), model.spec, sde)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
    dequantise_keys, probe_keys = (jax.vmap(jax.random.fold_in, (0, None))(keys, i) for i in (0, 1))
    x, offset = odl.dequantize(images, dequantise_keys, config.dequantisation)
    result = odl.log_likelihood(
      score,
      sde,
      x,
      probe_keys,
      divergence=divergence,
      solver=solver,
      weights=(index >= 0).astype(jnp.float32),
    )
    counters = {
      name: jnp.full(index.shape, getattr(result.solution, name))
      for name in ("nfe", "accepted", "rejected")
    }
    finished = jnp.full(index.shape, result.solution.finished)
    return {
      "bpd": odl.bits_per_dim(result.log_p, dims, offset),
      "nll_nats": -result.log_p,
      "finished": finished,
      **counters,
    }

  return nll_ode_fn


def evaluate_nll_ode(
  model: EmaModel,
  make_batches,
  config: NllOdeConfig,
  out_dir: str,
  *,
  key: jax.Array,
  num_batches: int | None = None,
) -> dict:
  """Mean ODE NLL (bits/dim) over the examples and `config.repeats` passes; resumes from `out_dir`.

  Call it on every process together.

  Args:
    model: the EMA parameters and what they need; params replicated over all devices.
    make_batches: () -> this process's `{"image", "label", "mask", "index"}`
      batches (`data.make_eval_iterator`), called once per repeat.
    config: the solver, divergence, dequantisation and repeats.
    out_dir: where process 0 saves each finished batch, repeat r under
      repeat<r>/; name it after every setting that changes the results.
    key: repeat r uses fold_in(key, r), and its example i fold_in of that with i.
    num_batches: the iterator's length, for the progress bar.

  Returns:
    {"bpd", "nll_nats", "nfe" (per image), "accepted", "rejected": means over
    examples and repeats; "bpd_per_repeat"; "num_examples"; the settings};
    the same on every process.

  Raises:
    RuntimeError: the adaptive solver ran out of `max_steps` on a batch.
  """
  mesh = parallel.make_mesh()
  batch_sharding = parallel.batch_sharding(mesh)
  fn = jax.jit(
    make_nll_ode_fn(model, config),
    out_shardings=batch_sharding,
    compiler_options=parallel.compiler_options(mesh),
  )
  repeats = []
  for r in range(config.repeats):
    repeat_key = jax.random.fold_in(key, r)
    results = nll.run_batches(
      lambda inputs: fn(
        model.params, inputs["image"], inputs["label"], inputs["index"], repeat_key
      ),
      make_batches(),
      files.join(out_dir, f"repeat{r}"),
      batch_sharding,
      desc=f"nll_ode {r + 1}/{config.repeats}",
      num_batches=num_batches,
    )
    for b, result in enumerate(results):
      if not np.all(result["finished"]):
        raise RuntimeError(
          f"nll_ode: the ODE solver did not reach t = 1 in nll_ode.max_steps="
          f"{config.max_steps} steps on batch {b} of repeat {r}; raise it or"
          " the tolerances (nll_ode.rtol, nll_ode.atol)."
        )
    repeats.append(nll.mean_parts(results, PARTS))
  means = {part: float(np.mean([m[part] for m in repeats])) for part in PARTS}
  return {
    **means,
    "bpd_per_repeat": [m["bpd"] for m in repeats],
    "num_examples": repeats[0]["num_examples"],
    "repeats": config.repeats,
    "solver": config.solver,
    "rtol": config.rtol,
    "atol": config.atol,
    "divergence": config.divergence,
    "probe": config.probe,
    "probes": config.probes,
    "dequantisation": config.dequantisation,
  }
