"""diffusers UNet2DModel directories converted, against diffusers' forward pass."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import peers
from configs import digits
from diffusion_jax import checkpoint, convert
from diffusion_jax.convert import ConvertError
from diffusion_jax.models import unet
from diffusion_jax.train import loop
from diffusion_jax.runs import load_ema_for_sampling

peers.import_torchvision()  # diffusers imports torchvision; the CPU torch needs the shim
from diffusers import UNet2DModel  # noqa: E402  pylint: disable=g-import-not-at-top

# google/ddpm-cifar10-32's config.json.
DDPM_CIFAR10 = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  layers_per_block=2,
  attention_head_dim=None,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
  norm_eps=1e-6,
  act_fn="silu",
  center_input_sample=False,
  mid_block_scale_factor=1,
  norm_num_groups=32,
  time_embedding_type="positional",
)
NARROW = dict(
  DDPM_CIFAR10,
  sample_size=16,
  block_out_channels=(32, 64, 64),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  layers_per_block=1,
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
TOLERANCE = 1e-4  # max abs, float32


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter drawn at random (no zero-initialised layer can hide a mapping error)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim == 1:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))
  return module.eval()


def save_model(config: dict, directory, legacy_bin: bool = False, seed: int = 0) -> UNet2DModel:
  """A random UNet2DModel saved in `directory`: safetensors, or .bin with pre-2023 names."""
  model = randomize(UNet2DModel(**config), seed)
  if not legacy_bin:
    model.save_pretrained(directory, safe_serialization=True)
    return model
  model.save_config(directory)
  state = {}
  for key, value in model.state_dict().items():
    for new, old in LEGACY_NAMES.items():
      key = key.replace(f".{new}.", f".{old}.")
    state[key] = value
  torch.save(state, directory / "diffusion_pytorch_model.bin")
  return model


def max_error(model: UNet2DModel, directory, t=(0, 371, 999), labels=None) -> float:
  """Max abs difference of the converted model and `model` on random images at timesteps t."""
  size, channels = model.config.sample_size, model.config.in_channels
  x = torch.randn(len(t), channels, size, size, generator=torch.Generator().manual_seed(1))
  t = torch.tensor(t)
  with torch.no_grad():
    expected = model(x, t, class_labels=labels).sample.permute(0, 2, 3, 1).numpy()
  converted = convert.convert(str(directory))
  y = None if labels is None else jnp.asarray(labels.numpy())
  out = unet.UNet(**converted.model).apply(
    {"params": converted.params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.asarray(t), y
  )
  return float(np.abs(np.asarray(out) - expected).max())


def test_ddpm_cifar10_layout_full_size(tmp_path):
  model = save_model(DDPM_CIFAR10, tmp_path)
  error = max_error(model, tmp_path, t=(10, 900))
  print(f"diffusers DDPM CIFAR-10 layout, full size: max abs error {error:.2e}")
  assert error < TOLERANCE
  converted = convert.convert(str(tmp_path))
  assert converted.model["ch_mult"] == (1, 2, 2, 2) and converted.model["attn_resolutions"] == (16,)
  assert converted.model["time_embedding"] == "ddpm"
  assert converted.model["downsample_padding"] == "SAME"
  assert converted.diffusion == dict(
    schedule="linear",
    num_timesteps=1000,
    mean_type="epsilon",
    var_type="fixed_small",
    loss="simple",
    clip_x0=True,
    rescale_timesteps=False,
  )


@pytest.mark.parametrize("legacy_bin", [False, True], ids=["safetensors", "legacy_bin"])
def test_narrow_ddpm_layout(tmp_path, legacy_bin):
  model = save_model(NARROW, tmp_path, legacy_bin)
  assert (tmp_path / "diffusion_pytorch_model.bin").exists() == legacy_bin
  error = max_error(model, tmp_path)
  print(
    f"diffusers narrow DDPM layout ({'legacy .bin' if legacy_bin else 'safetensors'}):"
    f" max abs error {error:.2e}"
  )
  assert error < TOLERANCE


def test_adm_style_settings(tmp_path):
  """[cos, sin] sinusoid, symmetric padding, AdaGN, head channels, classes, a learned variance."""
  config = dict(
    NARROW,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift",
    attn_norm_num_groups=32,
    attention_head_dim=16,
    num_class_embeds=5,
    out_channels=6,
  )
  model = save_model(config, tmp_path)
  (tmp_path / "scheduler_config.json").write_text(
    json.dumps(
      dict(
        _class_name="DDPMScheduler",
        num_train_timesteps=4000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="epsilon",
        clip_sample=False,
      )
    )
  )
  error = max_error(model, tmp_path, labels=torch.tensor([0, 4, 2]))
  print(f"diffusers ADM-style settings: max abs error {error:.2e}")
  assert error < TOLERANCE
  converted = convert.convert(str(tmp_path))
  assert (converted.diffusion["schedule"], converted.diffusion["num_timesteps"]) == ("cosine", 4000)
  assert converted.diffusion["var_type"] == "learned_range" and not converted.diffusion["clip_x0"]
  assert converted.model["num_head_channels"] == 16 and converted.model["num_classes"] == 5


def test_pipeline_directory_with_unet_and_scheduler_subfolders(tmp_path):
  model = save_model(NARROW, tmp_path / "unet")
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(
    json.dumps(
      dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")
    )
  )
  assert max_error(model, tmp_path) < TOLERANCE
  assert convert.convert(str(tmp_path)).diffusion["mean_type"] == "v"


@pytest.mark.parametrize(
  "change, named",
  [
    (
      dict(down_block_types=("DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D")),
      "AttnSkipDownBlock2D",
    ),
    (dict(up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")), "different resolutions"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(freq_shift=0), "(freq_shift, flip_sin_to_cos)"),
    (dict(mid_block_scale_factor=2), "mid_block_scale_factor"),
    (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups"),
    (dict(some_future_setting=3), "some_future_setting"),
  ],
)
def test_unsupported_settings_are_named(tmp_path, change, named):
  save_model(NARROW, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(ConvertError, match=named.replace("(", r"\(").replace(")", r"\)")):
    convert.convert(str(tmp_path))


def test_scheduler_betas_other_than_ours_are_refused(tmp_path):
  save_model(NARROW, tmp_path)
  (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(beta_end=0.012)))
  with pytest.raises(ConvertError, match="beta_end 0.012"):
    convert.convert(str(tmp_path))


def digits_shaped_workdir(tmp_path, step: int) -> str:
  """A random 8x8 grayscale UNet2DModel (the digits' shape) converted into a workdir."""
  config = dict(
    NARROW,
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  )
  save_model(config, tmp_path / "hub")
  workdir = str(tmp_path / "converted")
  convert.write_workdir(convert.convert(str(tmp_path / "hub"), step=step), workdir)
  return workdir


def test_launch_evaluate_accepts_a_converted_workdir(tmp_path):
  """A converted digits-shaped model through launch.evaluate's NLL, as our runs."""
  workdir = digits_shaped_workdir(tmp_path, step=7)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.evaluate",
      "--config=configs/eval/digits.py:smoke",
      f"--workdir={workdir}",
      "--config.metrics=nll",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(open(os.path.join(workdir, "eval", "digits-step7", "report.json")).read())
  assert report["checkpoint_step"] == 7 and np.isfinite(report["nll"]["bpd"])


def test_training_continues_from_a_converted_workdir(tmp_path):
  """Fine-tuning: the converted checkpoint (no data position saved) is restored and trained on."""
  workdir = digits_shaped_workdir(tmp_path, step=7)
  config = checkpoint.load_config(workdir)
  config.data = digits.get_config("smoke").data
  config.optim.warmup_steps = 0
  config.train.update(
    batch_size=8, num_steps=9, log_every=1, sample_every=0, num_samples=4, sample_steps=2
  )
  converted = load_ema_for_sampling(workdir)
  state = loop.train_and_evaluate(config, workdir)
  assert int(state.step) == 9
  changes = jax.tree.map(
    lambda a, b: float(np.abs(a - b).max()),
    jax.device_get(state.params),
    jax.device_get(converted.params),
  )
  assert 0 < max(jax.tree.leaves(changes)) < 0.1  # trained from the converted weights
