"""Classifier-free guidance is trained: label dropout makes the null label the unconditional model.

A two-class toy with closed forms: class c's "images" are x_0 ~ N(MEANS[c], S^2 I)
on 2x2x1 pixels, so E[eps | x_t, c] is affine in x_t and the unconditional
E[eps | x_t] is their mixture weighted by p(c | x_t). A small network is
trained by the library's train step with label dropout 0.2 and 0; only the
first makes the null label (index NUM_CLASSES) the unconditional denoiser and
guided samples those of the exact guided model (Ho & Salimans 2022).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import losses, sampling, schedules
from diffusion_jax.diffusion import ModelSpec
from diffusion_jax.models import layers
from diffusion_jax.train.diffusion_step import StepFns, drop_labels, train_step
from diffusion_jax.train.state import TrainState

T = 1000
SCHEDULE = schedules.get_schedule("linear", T)
SPEC = ModelSpec("epsilon", "fixed_large", clip_x0=False)
NUM_CLASSES, MEANS, S, SHAPE = 2, np.array([-0.5, 0.5]), 0.1, (2, 2, 1)
NULL = NUM_CLASSES
GUIDANCE = 3.0


class ToyDenoiser(nn.Module):
  """An MLP on the 4 pixels with the zoo's time and label embedding (null label included)."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    del train
    emb = layers.TimeEmbedding(32, 128, num_classes=NUM_CLASSES)(t, y)
    h = nn.swish(nn.Dense(128)(x.reshape(x.shape[0], -1)) + emb)
    h = nn.swish(nn.Dense(128)(h))
    return nn.Dense(int(np.prod(SHAPE)))(h).reshape(x.shape)


def apply(params, x, t, y, **kwargs):
  del kwargs  # train, rngs: the toy has no dropout
  return ToyDenoiser().apply({"params": params}, x, t, y)


def exact_apply(params, x_t, t, y):
  """E[eps | x_t, y] of the toy, y = NULL giving the unconditional E[eps | x_t]."""
  del params
  abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
  var = abar * S**2 + 1.0 - abar  # of x_t given the class
  centred = [x_t - jnp.sqrt(abar) * m for m in MEANS]
  log_likelihood = jnp.stack(
    [-jnp.sum(c**2, (1, 2, 3)) / (2 * var[:, 0, 0, 0]) for c in centred], -1
  )
  prior = jnp.where((y == NULL)[:, None], 1.0 / NUM_CLASSES, jax.nn.one_hot(y, NUM_CLASSES))
  posterior = jax.nn.softmax(log_likelihood + jnp.log(prior + 1e-30), axis=-1)  # p(c | x_t, y)
  return sum(
    posterior[:, c, None, None, None] * jnp.sqrt(1.0 - abar) * centred[c] / var
    for c in range(NUM_CLASSES)
  )


def toy_batch(key, batch_size):
  label_key, noise_key = jax.random.split(key)
  labels = jax.random.randint(label_key, (batch_size,), 0, NUM_CLASSES)
  images = jnp.asarray(MEANS, jnp.float32)[labels][:, None, None, None] + S * jax.random.normal(
    noise_key, (batch_size, *SHAPE)
  )
  return {"image": images, "label": labels}


@functools.cache
def trained_params(label_dropout: float, steps: int = 1500, batch_size: int = 256):
  """The toy trained by train_step with `label_dropout`, all steps in one lax.scan."""
  tx = optax.adam(2e-3)
  fns = StepFns(
    apply=apply,
    tx=tx,
    lr_schedule=optax.constant_schedule(2e-3),
    spec=SPEC,
    schedule=SCHEDULE,
    loss_type=losses.LossType.SIMPLE,
    timestep_sampler=losses.UniformSampler(T),
    ema_decay=0.0,
    num_classes=NUM_CLASSES,
    label_dropout=label_dropout,
  )
  zeros = jnp.zeros((1,), jnp.int32)
  params = ToyDenoiser().init(jax.random.key(0), jnp.zeros((1, *SHAPE)), zeros, zeros)["params"]
  state = TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    ema_params=params,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(1),
    sampler_state=(),
  )

  def step(state, key):
    return train_step(state, toy_batch(key, batch_size), fns)[0], None

  keys = jax.random.split(jax.random.key(2), steps)
  return jax.jit(lambda state: jax.lax.scan(step, state, keys)[0].params)(state)


@jax.jit
def null_label_errors(params):
  """Mean squared distance of the null-label prediction from the unconditional E[eps | x_t],
  and, for scale, of the two classes' E[eps | x_t, c] from each other; on x_t of the data."""
  t_key, data_key, noise_key = jax.random.split(jax.random.key(5), 3)
  n = 2048
  t = jax.random.randint(t_key, (n,), 0, T)
  x_t = jnp.sqrt(SCHEDULE.alphas_cumprod[t])[:, None, None, None] * toy_batch(data_key, n)["image"]
  x_t += jnp.sqrt(1.0 - SCHEDULE.alphas_cumprod[t])[:, None, None, None] * jax.random.normal(
    noise_key, x_t.shape
  )
  label = lambda c: jnp.full((n,), c)
  null_error = jnp.mean(
    jnp.square(apply(params, x_t, t, label(NULL)) - exact_apply(None, x_t, t, label(NULL)))
  )
  label_effect = jnp.mean(
    jnp.square(exact_apply(None, x_t, t, label(0)) - exact_apply(None, x_t, t, label(1)))
  )
  return null_error, label_effect


@functools.cache
def guided_sampler(guidance_scale: float):
  """(apply_fn, params) -> 256 DDIM samples of each class, the first half class 0."""
  config = sampling.SamplerConfig("ddim", steps=50, guidance_scale=guidance_scale)
  labels = np.repeat(np.arange(NUM_CLASSES), 256)

  @functools.partial(jax.jit, static_argnums=0)
  def sample(apply_fn, params):
    return sampling.make_batch_sampler(
      config, apply_fn, SPEC, SCHEDULE, SHAPE, labels.size, num_classes=NUM_CLASSES, labels=labels
    )(params, jax.random.key(7))

  return sample


def toward_class(samples):
  """Mean signed pixel value in the direction of each sample's class: [NUM_CLASSES]."""
  return np.asarray([-samples[:256].mean(), samples[256:].mean()])


def test_label_dropout_drops_p_uncond_of_the_labels_to_the_null_label_only():
  n, p_uncond = 100_000, 0.1
  labels = np.asarray(jax.random.randint(jax.random.key(0), (n,), 0, NUM_CLASSES))
  dropped = np.asarray(drop_labels(jnp.asarray(labels), jax.random.key(1), p_uncond, NULL))
  is_null = dropped == NULL
  np.testing.assert_array_equal(dropped[~is_null], labels[~is_null])  # the rest are kept
  # The count of dropped labels is Binomial(n, p): within 5 standard deviations (~95) of n p.
  assert abs(is_null.sum() - n * p_uncond) < 5 * math.sqrt(n * p_uncond * (1 - p_uncond)), (
    is_null.sum()
  )
  for p, expected in ((0.0, labels), (1.0, np.full(n, NULL))):
    np.testing.assert_array_equal(
      drop_labels(jnp.asarray(labels), jax.random.key(1), p, NULL),
      expected,
      err_msg=f"p_uncond={p}",
    )


def test_label_dropout_trains_the_null_label_as_the_unconditional_denoiser():
  error, label_effect = null_label_errors(trained_params(0.2))
  assert error < 0.02 * label_effect, (error, label_effect)  # measured ~0.004
  untrained_error, _ = null_label_errors(trained_params(0.0))  # the null row never trained
  assert untrained_error > 0.1 * label_effect, (untrained_error, label_effect)  # measured ~0.28


def test_guidance_moves_samples_to_the_exact_guided_ones_only_with_label_dropout():
  exact = toward_class(guided_sampler(GUIDANCE)(exact_apply, None))
  assert np.all(exact > toward_class(guided_sampler(0.0)(exact_apply, None)) + 0.03)
  for label_dropout, matches in ((0.2, True), (0.0, False)):
    params = trained_params(label_dropout)
    unguided = toward_class(guided_sampler(0.0)(apply, params))
    guided = toward_class(guided_sampler(GUIDANCE)(apply, params))
    np.testing.assert_allclose(unguided, MEANS[1], atol=0.05)  # the conditional model is good
    assert np.all(guided > unguided), (label_dropout, guided, unguided)
    # Guided by the untrained null row, samples overshoot far past the exact guided ones.
    assert np.all(np.abs(guided - exact) < 0.2) == matches, (label_dropout, guided, exact)
