"""Tests of diffusion_jax.models: counts against the papers, shapes, numerics.

Full-size models are only traced (jax.eval_shape); real computation uses tiny
variants, with parameters drawn in numpy from eval_shape shapes so no XLA
program is compiled for `init`. Compiling dominates these tests on a CPU, so
they skip XLA's backend (LLVM) optimisations, which change no numerics.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax.models import (
  MODEL_ZOO,
  RonnebergerUNet,
  TimeEmbedding,
  UNet,
  abstract_init,
  center_crop,
  count_params,
  entry_shapes,
  get_model,
  param_count,
  timestep_embedding,
  valid_output_size,
  zoo_table,
)
from diffusion_jax.models import __main__ as models_main
from diffusion_jax.models.layers import AttentionBlock, GroupNorm

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Two levels (16x16 and 8x8), one block each, attention at 8x8.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
T = jnp.array([3, 700])


def random_params(model, *inputs):
  """N(0, 0.1^2) parameters shaped by eval_shape (no compiled init).

  Unlike the real init, output convs are not zero, so the output depends on
  every input from the start.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32), shapes)


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---- parameter counts and shapes of the zoo --------------------------------


@pytest.mark.parametrize("name", list(MODEL_ZOO))
def test_param_count_matches_registry(name):
  assert param_count(name) == MODEL_ZOO[name].params


def test_ddpm_param_counts_match_published_models():
  # The TF release of Ho et al. 2020 and diffusers' google/ddpm-* ports.
  assert param_count("ddpm_cifar10") == 35_746_307
  assert param_count("ddpm_celebahq256") == 113_673_219
  assert param_count("ddpm_lsun256") == 113_673_219


def test_adm_param_count_matches_paper():
  count = param_count("adm_imagenet64_cond")
  assert round(count / 1e6) == 296  # "296M" in Dhariwal & Nichol 2021
  null_row = 4 * MODEL_ZOO["adm_imagenet64_cond"].kwargs["ch"]
  unconditional_model = get_model("adm_imagenet64_cond", num_classes=None)
  unconditional = count_params(abstract_init(unconditional_model, (64, 64, 3))[1]["params"])
  assert count - unconditional == 1001 * null_row  # 1000 classes + null label


@pytest.mark.parametrize("name", list(MODEL_ZOO))
def test_full_size_output_shape(name):
  out, _ = entry_shapes(name)
  h, w, c = MODEL_ZOO[name].input_shape
  if MODEL_ZOO[name].module is UNet:
    assert out.shape == (1, h, w, 2 * c if get_model(name).learn_sigma else c)
  else:
    assert out.shape == (1, valid_output_size(h), valid_output_size(w), get_model(name).num_classes)
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["ddpm_cifar10", "ddpm_celebahq256", "ddpm_lsun256"])
def test_ddpm_entries_use_ddpm_conventions(name):
  model = get_model(name)
  assert (model.time_embedding, model.downsample_padding, model.norm_eps) == ("ddpm", "SAME", 1e-6)


@pytest.mark.parametrize("name", ["iddpm_cifar10", "iddpm_imagenet64", "adm_imagenet64_cond"])
def test_openai_entries_use_openai_conventions(name):
  model = get_model(name)
  assert (model.time_embedding, model.downsample_padding, model.norm_eps) == ("adm", 1, 1e-5)
  assert model.learn_sigma and model.scale_shift_norm


# ---- layers -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
@pytest.mark.parametrize("dim", [64, 7])
def test_timestep_embedding_matches_numpy(kind, dim):
  t = np.array([0, 1, 17, 999], np.float64)
  half = dim // 2
  denominator = half - 1 if kind == "ddpm" else half
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / denominator)
  args = t[:, None] * freqs[None, :]
  parts = [np.sin(args), np.cos(args)] if kind == "ddpm" else [np.cos(args), np.sin(args)]
  expected = np.concatenate(parts + [np.zeros((4, dim % 2))], axis=1)
  for t_dtype in (jnp.int32, jnp.float32):
    got = timestep_embedding(jnp.asarray(t, t_dtype), dim, kind)
    assert got.shape == (4, dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin of t ~ 1e3


def test_timestep_embedding_rejects_unknown_kind():
  with pytest.raises(ValueError, match="'ddpm' or 'adm'"):
    timestep_embedding(T, 8, "sd")


# ---- the diffusion U-Net on tiny inputs ---------------------------------------


@pytest.fixture(scope="module")
def tiny_ddpm():
  model = get_model("ddpm_cifar10", **TINY)
  return model, random_params(model, X, T), jit(model.apply)


@pytest.fixture(scope="module")
def tiny_adm():
  model = get_model("adm_imagenet64_cond", **TINY, num_classes=10, num_head_channels=32)
  params = random_params(model, X, T)
  apply = jit(lambda params, t, y: model.apply({"params": params}, X, t, y))
  return model, params, apply


def test_unet_output_depends_on_t(tiny_ddpm):
  model, params, apply = tiny_ddpm
  out = apply({"params": params}, X, T)
  assert out.shape == X.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  assert max_abs_diff(out, apply({"params": params}, X, T + 100)) > 1e-3


def test_unconditional_unet_rejects_labels(tiny_ddpm):
  model, params, _ = tiny_ddpm
  with pytest.raises(ValueError, match="num_classes=None"):
    jax.eval_shape(model.apply, {"params": params}, X, T, jnp.array([0, 1]))


def test_conditional_unet_depends_on_t_and_label(tiny_adm):
  model, params, apply = tiny_adm
  y = jnp.array([0, 0])
  out = apply(params, T, y)
  assert out.shape == (2, 16, 16, 6)  # learn_sigma doubles the channels
  assert max_abs_diff(out, apply(params, T + 100, y)) > 1e-3
  assert max_abs_diff(out, apply(params, T, y + 1)) > 1e-3
  assert params["time_emb"]["label_emb"]["embedding"].shape == (10 + 1, 4 * TINY["ch"])


def test_no_label_selects_the_null_row():
  embed = TimeEmbedding(dim=8, features=32, num_classes=3)
  params = random_params(embed, T, jnp.array([0, 0]))
  apply = jit(embed.apply)
  null = apply({"params": params}, T, None)
  np.testing.assert_array_equal(null, apply({"params": params}, T, jnp.array([3, 3])))
  assert max_abs_diff(null, apply({"params": params}, T, jnp.array([0, 0]))) > 1e-3


def test_dropout_only_in_training(tiny_ddpm):
  model, params, apply = tiny_ddpm
  train = jit(lambda key: model.apply({"params": params}, X, T, train=True, rngs={"dropout": key}))
  eval_out = apply({"params": params}, X, T)
  assert max_abs_diff(train(jax.random.key(0)), train(jax.random.key(1))) > 1e-3
  assert max_abs_diff(train(jax.random.key(0)), eval_out) > 1e-3


def test_bfloat16_close_to_float32(tiny_ddpm):
  model, params, apply = tiny_ddpm
  model_bf16 = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model_bf16.init, jax.random.key(0), X, T)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  out32 = apply({"params": params}, X, T)
  out16 = jit(model_bf16.apply)({"params": params}, X, T)
  assert out16.dtype == jnp.float32
  error = max_abs_diff(out16, out32)
  assert 0 < error < 0.05 * float(np.max(np.abs(out32)))


def test_remat_gives_the_same_gradients():
  # The smallest U-Net: conv_in, the middle, one up block (3 ResBlocks).
  config = dict(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), dropout=0.1)
  x = X[:, :8, :8]
  plain, remat = (
    get_model("ddpm_cifar10", **config),
    get_model("ddpm_cifar10", **config, remat=True),
  )
  params = random_params(plain, x, T)

  def loss(params, model):
    out = model.apply({"params": params}, x, T, train=True, rngs={"dropout": jax.random.key(0)})
    return jnp.mean(out**2)

  grad = jax.grad(loss)
  assert "remat" in str(jax.make_jaxpr(grad, static_argnums=1)(params, remat))
  assert "remat" not in str(jax.make_jaxpr(grad, static_argnums=1)(params, plain))
  grads_plain = jit(grad, static_argnums=1)(params, plain)
  grads_remat = jit(grad, static_argnums=1)(params, remat)
  # Equal up to float32 rounding of differently fused XLA programs.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8)
  jax.tree.map(close, grads_plain, grads_remat)


def test_unet_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(
      get_model("ddpm_cifar10").init, jax.random.key(0), jnp.zeros((1, 20, 20, 3)), T[:1]
    )


# ---- the zoo's interface ------------------------------------------------------


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="unknown model 'ddpm_mnist'") as error:
    get_model("ddpm_mnist")
  assert all(name in str(error.value) for name in MODEL_ZOO)


def test_unknown_override_is_named():
  with pytest.raises(ValueError, match=r"\['channels'\]"):
    get_model("ddpm_cifar10", channels=64)


def test_get_model_from_config_mapping():
  config = ml_collections.ConfigDict({"name": "iddpm_cifar10", "ch": 64, "ch_mult": [1, 2]})
  model = get_model(config, dropout=0.0)
  assert (model.ch, model.ch_mult, model.dropout, model.num_res_blocks) == (64, (1, 2), 0.0, 3)
  assert get_model({"name": "unet_ronneberger", "features": 8}).features == 8
  with pytest.raises(ValueError, match="'name' key"):
    get_model({"ch": 64})


def test_docs_hold_the_current_zoo_table():
  docs = pathlib.Path(__file__).parents[1] / "docs" / "model_zoo.md"
  assert zoo_table() in docs.read_text()


def test_main_prints_table_and_overview(capsys):
  models_main.main(["models"])
  assert "| `adm_imagenet64_cond` |" in capsys.readouterr().out
  models_main.main(["models", "unet_ronneberger"])
  assert "Total: 31,030,658" in capsys.readouterr().out


# ---- Ronneberger et al. 2015 --------------------------------------------------


def test_ronneberger_has_23_conv_layers():
  leaves = jax.tree_util.tree_leaves_with_path(entry_shapes("unet_ronneberger")[1])
  kernels = [leaf for path, leaf in leaves if path[-1].key == "kernel"]
  assert len(kernels) == 23 and all(k.ndim == 4 for k in kernels)


def test_ronneberger_param_count_from_layer_list():
  def conv(k, c_in, c_out):
    return k * k * c_in * c_out + c_out

  channels = [64, 128, 256, 512, 1024]
  layers = [conv(3, 1, 64), conv(3, 64, 64)]
  for c_in, c_out in zip(channels, channels[1:]):  # contracting path and bottom
    layers += [conv(3, c_in, c_out), conv(3, c_out, c_out)]
  for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]):  # expansive path
    layers += [conv(2, c_in, c_out), conv(3, 2 * c_out, c_out), conv(3, c_out, c_out)]
  layers.append(conv(1, 64, 2))
  assert len(layers) == 23
  assert count_params(entry_shapes("unet_ronneberger")[1]) == sum(layers)
  assert MODEL_ZOO["unet_ronneberger"].params == sum(layers)


def test_ronneberger_572_gives_388():  # paper Fig. 1
  assert MODEL_ZOO["unet_ronneberger"].input_shape == (572, 572, 1)
  assert entry_shapes("unet_ronneberger")[0].shape == (1, 388, 388, 2)
  assert valid_output_size(572) == 388


def test_ronneberger_rejects_sizes_with_odd_pooling():
  with pytest.raises(ValueError, match="odd"):
    valid_output_size(570)
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(
      RonnebergerUNet(padding="SAME").init, jax.random.key(0), jnp.zeros((1, 40, 40, 1))
    )


def test_center_crop_is_centred():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 568, 568, 3)), jnp.float32)
  np.testing.assert_array_equal(center_crop(x, 392, 392), x[:, 88:480, 88:480])
  small = jnp.arange(2 * 10 * 12 * 1).reshape(2, 10, 12, 1)
  np.testing.assert_array_equal(center_crop(small, 4, 6), small[:, 3:7, 3:9])


def test_ronneberger_same_padding_keeps_size():
  model = get_model("unet_ronneberger", padding="SAME")
  out, _ = abstract_init(model, (96, 96, 1))  # 96 = 16 * 6, not a valid unpadded size
  assert out.shape == (1, 96, 96, 2)


# ---- GroupNorm -----------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["matmul", "reduce"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (3, 4, 4, 96)])
def test_group_norm_matches_flax_values_and_gradients(shape, implementation):
  """Each implementation, forced on this CPU, against nn.GroupNorm: the same outputs and
  gradients, so the per-platform choice changes nothing but speed."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(2.0 + 3.0 * rng.normal(size=shape), jnp.float32)  # off-centre, wide
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = GroupNorm(epsilon=1e-5, implementation=implementation)
  flax_gn = nn.GroupNorm(epsilon=1e-5)
  params = jax.tree.map(
    lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32),  # non-trivial affine
    flax_gn.init(jax.random.key(0), x),
  )
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)

  def loss(module, params, x):
    return jnp.sum(module.apply(params, x) * cotangent)

  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4)
  for argnum in (1, 2):  # d/d params, d/d x
    grad = jax.grad(loss, argnums=argnum)
    jax.tree.map(close, grad(ours, params, x), grad(flax_gn, params, x))
  np.testing.assert_allclose(ours.apply(params, x), flax_gn.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,matmuls", [("cpu", True), ("tpu", False), ("cuda", False)])
def test_group_norm_uses_matmul_statistics_on_cpu_only(platform, matmuls):
  """ "auto" lowers to the HIGHEST-precision matmuls for a CPU and to reductions elsewhere."""
  x = jnp.ones((2, 4, 4, 64))
  module = GroupNorm()
  params = module.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1)))
  hlo = jax.export.export(grad, platforms=[platform])(params, x).mlir_module()
  assert ("precision = [HIGHEST, HIGHEST]" in hlo) == matmuls
  with pytest.raises(ValueError, match="implementation must be one of"):
    GroupNorm(implementation="fast").init(jax.random.key(0), x)


def test_group_norm_normalises_each_group():
  x = jnp.asarray(np.random.default_rng(4).normal(5.0, 2.0, size=(2, 4, 4, 64)), jnp.float32)
  y = GroupNorm().apply({"params": {"scale": jnp.ones(64), "bias": jnp.zeros(64)}}, x)
  groups = np.asarray(y).reshape(2, 16, 32, 2).transpose(0, 2, 1, 3).reshape(2, 32, -1)
  np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(groups.var(-1), 1.0, atol=1e-4)


def test_group_norm_keeps_float32_statistics_in_bfloat16():
  # Mean 10, std 1: E[x^2] - E[x]^2 summed in bfloat16 (8 bits) would lose the variance.
  x = jnp.asarray(np.random.default_rng(5).normal(10.0, 1.0, size=(2, 8, 8, 32)), jnp.bfloat16)
  params = {"params": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}
  y = GroupNorm(dtype=jnp.bfloat16).apply(params, x)
  assert y.dtype == jnp.bfloat16
  reference = nn.GroupNorm().apply(params, x.astype(jnp.float32))
  np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=0.04)


def test_group_norm_rejects_indivisible_channels():
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    GroupNorm().init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


def _attention_blocks(dtype, num_heads: int, implementation: str):
  """(ours with `implementation`, the same block through Flax's softmax attention as it was)."""
  ours = AttentionBlock(num_heads=num_heads, dtype=dtype, implementation=implementation)

  class FlaxAttention(AttentionBlock):  # the block before fused attention: same parameters
    @nn.compact
    def __call__(self, x):
      b, height, width, c = x.shape
      h = GroupNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)
      attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, force_fp32_for_softmax=True, name="attn"
      )
      return x + attention(h.reshape(b, height * width, c)).reshape(x.shape)

  return ours, FlaxAttention(num_heads=num_heads, dtype=dtype)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_fused_attention_equals_flax_attention(num_heads):
  """model.attention_impl="xla" (and "auto" on a CPU): the same parameters, outputs and
  gradients as Flax's attention with a float32 softmax, which the U-Nets used before."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 64)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  for implementation in ("xla", "auto"):
    ours, theirs = _attention_blocks(jnp.float32, num_heads, implementation)
    params = jax.tree.map(  # a non-zero output projection, so attention shows in the output
      lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
      theirs.init(jax.random.key(0), x),
    )
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)
    grad = lambda module: jax.grad(lambda p: jnp.sum(module.apply(p, x) * cotangent))(params)
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4), grad(ours), grad(theirs)
    )


def test_fused_attention_keeps_a_float32_softmax_in_bfloat16():
  """In bfloat16 the logits and softmax stay float32: as close to the float32 block as Flax's."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 64)), jnp.float32)
  ours, theirs = _attention_blocks(jnp.bfloat16, 1, "xla")
  params = jax.tree.map(
    lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
    ours.init(jax.random.key(0), x),
  )
  reference = _attention_blocks(jnp.float32, 1, "xla")[0].apply(params, x)
  error = lambda module: float(jnp.max(jnp.abs(module.apply(params, x) - reference)))
  assert error(ours) <= 2 * error(theirs) + 1e-3 and error(ours) < 0.05 * float(jnp.max(reference))


def test_unknown_attention_impl_is_named():
  with pytest.raises(ValueError, match="model.attention_impl must be one of"):
    AttentionBlock(implementation="flash").init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))
