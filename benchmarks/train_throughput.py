"""Training throughput of our jitted train step against diffusers' UNet2DModel on PyTorch.

    python -m benchmarks.train_throughput --batch_size=8 --steps=3        # the 35.7M DDPM
    python -m benchmarks.train_throughput --ch=64 --batch_size=16 --rounds=3
    python -m benchmarks.train_throughput --ch=64 --batch_size=16 --xla_defaults

Ours: `diffusion_jax.train.loop.compile_train_step`, the real step (timestep
and noise sampling, q_sample, U-Net forward and backward, L_simple, global-norm
clipping, optax Adam, EMA), on the mesh of all local devices.
Theirs: diffusers' `UNet2DModel` with the same architecture, random weights,
doing the same work eagerly: q_sample with our schedule's alpha_bar, MSE on
eps, backward, clip_grad_norm_, torch.optim.Adam, EMA by `_foreach_lerp_`;
`torch.set_num_threads(cores)`. Without torch and diffusers (the `bench`
extra) only our number is printed.

Rounds alternate ours and theirs, so a busy machine slows both alike; each
side's best round is reported. FLOPs are XLA's cost analysis of our compiled
step; theirs are taken as equal (same network, same batch).
"""

import ast
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from benchmarks import peers
from diffusion_jax import models, parallel
from diffusion_jax.train import diffusion_task, loop

_MODEL = flags.DEFINE_string("model", "ddpm_cifar10", "Zoo entry (a UNet).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per step.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Side in pixels; 0 keeps the entry's.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps before the rounds (after compiling).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of `steps` steps, ours then theirs.")
_CH = flags.DEFINE_integer("ch", 0, "Base channels override; 0 keeps the entry's.")
_OVERRIDES = flags.DEFINE_multi_string(
  "override", [], "Other UNet field overrides, FIELD=PYTHON_LITERAL, e.g. num_res_blocks=1."
)
_COMPILER_OPTIONS = flags.DEFINE_multi_string(
  "compiler_option",
  [],
  "XLA option for compiling our step, NAME=VALUE, over parallel.compiler_options (e.g. xla_cpu_*).",
)
_XLA_DEFAULTS = flags.DEFINE_bool(
  "xla_defaults", False, "Compile our step with XLA's defaults, not parallel.compiler_options."
)
_CHANNELS_LAST = flags.DEFINE_bool("torch_channels_last", False, "Run theirs in channels_last.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def model_overrides() -> dict:
  overrides = {"ch": _CH.value} if _CH.value else {}
  for item in _OVERRIDES.value:
    name, value = item.split("=", 1)
    overrides[name] = ast.literal_eval(value)
  return overrides


def compiler_options(mesh) -> dict[str, str]:
  """The framework's options for `mesh` (none with --xla_defaults), updated by --compiler_option."""
  framework = {} if _XLA_DEFAULTS.value else parallel.compiler_options(mesh)
  return framework | dict(item.split("=", 1) for item in _COMPILER_OPTIONS.value)


def benchmark_config(name: str, overrides: dict, image_shape, batch_size: int):
  """A training config for zoo model `name`: DDPM's process and optimizer (Ho et al. App. B)."""
  learn_sigma = models.get_model(name, **overrides).learn_sigma
  return ml_collections.ConfigDict(
    dict(
      seed=0,
      # Only the shape is read: the benchmark feeds one fixed batch.
      data=dict(source="digits", image_size=image_shape[0], num_channels=image_shape[2]),
      model=dict(name=name, **overrides),
      diffusion=dict(
        schedule="linear",
        num_timesteps=1000,
        **(dict(var_type="learned_range", loss="hybrid") if learn_sigma else {}),
      ),
      optim=dict(optimizer="adam", lr=2e-4, warmup_steps=1, grad_clip=1.0),
      train=dict(batch_size=batch_size, ema_decay=0.9999),
    )
  )


@dataclasses.dataclass
class Result:
  """One side's measurement: parameter count and the wall time of every timed step."""

  params: int
  step_times: list[float] = dataclasses.field(default_factory=list)

  @property
  def best(self) -> float:
    return min(self.step_times)


def ours(exp: diffusion_task.Experiment, mesh, batch_size: int, options: dict):
  """(run(n) timing n steps into a Result, step FLOPs, compile seconds) for our train step."""
  state, shardings = loop.create_state(exp, mesh, seed=0)
  x_BxHxWxC = np.random.default_rng(0).uniform(-1, 1, (batch_size, *exp.image_shape))
  batch = jax.device_put(
    {"image": jnp.asarray(x_BxHxWxC, jnp.float32), "label": jnp.zeros((batch_size,), jnp.int32)},
    parallel.batch_sharding(mesh),
  )
  start = time.perf_counter()
  step = loop.compile_train_step(exp, shardings, mesh, options).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  result = Result(models.count_params(state.params))

  def run(n: int, record: bool = True):
    nonlocal state
    for _ in range(n):
      start = time.perf_counter()
      state, _ = step(state, batch)
      jax.block_until_ready(state)
      if record:
        result.step_times.append(time.perf_counter() - start)

  return run, result, step.cost_analysis()["flops"], compile_s


def theirs(torch, exp: diffusion_task.Experiment, batch_size: int, channels_last: bool):
  """(run(n), Result) for diffusers' UNet2DModel trained as our step trains ours."""
  height, _, channels = exp.image_shape
  unet = peers.diffusers_unet(exp.model, height, channels).train()
  layout = torch.channels_last if channels_last else torch.contiguous_format
  unet = unet.to(memory_format=layout)
  params = list(unet.parameters())
  optimizer = torch.optim.Adam(params, lr=exp.optim.lr)
  ema = [p.detach().clone() for p in params]
  alphas_cumprod = torch.tensor(np.asarray(exp.schedule.alphas_cumprod))
  x_start = (torch.rand(batch_size, channels, height, height) * 2 - 1).contiguous(
    memory_format=layout
  )
  result = Result(peers.count_torch_params(unet))

  def train_step():
    t = torch.randint(0, len(alphas_cumprod), (batch_size,))
    noise = torch.randn_like(x_start)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * noise
    eps = unet(x_t, t).sample[:, :channels]
    loss = torch.nn.functional.mse_loss(eps, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, exp.optim.grad_clip)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - exp.train.ema_decay)

  def run(n: int, record: bool = True):
    for _ in range(n):
      start = time.perf_counter()
      train_step()
      if record:
        result.step_times.append(time.perf_counter() - start)

  return run, result


def summary(
  name: str,
  exp,
  batch_size: int,
  options: dict,
  our: Result,
  flops: float,
  compile_s: float,
  their: Result | None,
  note: str | None,
) -> dict:
  """Everything measured, as printed by --json."""
  out = dict(
    model=name,
    overrides=model_overrides(),
    image_shape=exp.image_shape,
    batch_size=batch_size,
    compiler_options=options,
    cores=os.cpu_count(),
    platform=jax.devices()[0].platform,
    step_flops=flops,
    compile_s=compile_s,
    ours_params=our.params,
    ours_step_s=our.step_times,
    ours_images_per_s=batch_size / our.best,
    ours_flops_per_s=flops / our.best,
  )
  if their is None:
    return dict(out, peer_note=note)
  return dict(
    out,
    theirs_params=their.params,
    params_match=our.params == their.params,
    theirs_step_s=their.step_times,
    theirs_images_per_s=batch_size / their.best,
    theirs_flops_per_s=flops / their.best,
    ratio_ours_over_theirs=their.best / our.best,
  )


def print_table(s: dict) -> None:
  h, w, c = s["image_shape"]
  print(
    f"{s['model']} {s['overrides']}, batch {s['batch_size']} of {h}x{w}x{c}, "
    f"{s['cores']} cores ({s['platform']}); compiler options {s['compiler_options'] or 'none'}"
  )
  print(
    f"step: {s['step_flops'] / 1e9:.1f} GFLOP (XLA cost analysis); our compile {s['compile_s']:.0f} s"
  )
  print(f"{'':<26}{'params':>12}{'best s/step':>13}{'median':>9}{'images/s':>10}{'GFLOP/s':>9}")
  rows = [("ours (jax)", "ours")] + (
    [("diffusers UNet2DModel", "theirs")] if "theirs_params" in s else []
  )
  for label, key in rows:
    times = s[f"{key}_step_s"]
    print(
      f"{label:<26}{s[f'{key}_params']:>12,}{min(times):>13.3f}{statistics.median(times):>9.3f}"
      f"{s[f'{key}_images_per_s']:>10.2f}{s[f'{key}_flops_per_s'] / 1e9:>9.1f}"
    )
  if "theirs_params" in s:
    print(f"param counts match: {'yes' if s['params_match'] else 'NO'}")
    print(f"ratio ours/theirs (images/s): {s['ratio_ours_over_theirs']:.2f}")
  else:
    print(f"no diffusers number: {s['peer_note']}")


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  name, overrides, options = _MODEL.value, model_overrides(), compiler_options(mesh)
  entry = models.lookup(name)
  side = _IMAGE_SIZE.value or entry.input_shape[0]
  batch_size = _BATCH_SIZE.value
  exp = diffusion_task.build(
    benchmark_config(name, overrides, (side, side, entry.input_shape[2]), batch_size)
  )
  run_ours, our, flops, compile_s = ours(exp, mesh, batch_size, options)
  torch, note = peers.import_peer()
  run_theirs, their = None, None
  if torch is not None:
    try:
      run_theirs, their = theirs(torch, exp, batch_size, _CHANNELS_LAST.value)
    except ValueError as e:
      note = str(e)
  runs = [run_ours] + ([run_theirs] if run_theirs else [])
  for run in runs:
    run(_WARMUP.value, record=False)
  for _ in range(_ROUNDS.value):
    for run in runs:
      run(_STEPS.value)
  s = summary(name, exp, batch_size, options, our, flops, compile_s, their, note)
  if _JSON.value:
    print(json.dumps(s))
  else:
    print_table(s)


if __name__ == "__main__":
  app.run(main)
