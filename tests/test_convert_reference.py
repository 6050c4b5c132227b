"""improved-/guided-diffusion and pytorch_diffusion checkpoints against the original code's outputs.

tests/data/*.npz hold what the original PyTorch code computed on random weights
(see tests/data/README.md; tests/data/make_references.py remakes them); the
converted model must reproduce it within 1e-4.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax import convert, process, weightfiles
from diffusion_jax.config.diffusion import DiffusionConfig
from diffusion_jax.convert import ConvertError, openai_flags
from diffusion_jax.convert.converted import typed_flags
from diffusion_jax.models import unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
TOLERANCE = 1e-4  # max abs, float32


def reference(name: str) -> tuple[dict, dict]:
  """(the arrays of NAME.npz, its flags) of a reference in tests/data."""
  arrays = dict(np.load(os.path.join(DATA, f"{name}.npz")))
  return arrays, json.loads(str(arrays.pop("flags")))


def converted_output(converted, x, t, y=None) -> np.ndarray:
  """The converted network on diffusion timesteps t, through the config's timestep mapping."""
  t_model = process.network_timesteps(DiffusionConfig(**converted.diffusion), jnp.asarray(t))
  y = None if y is None else jnp.asarray(y)
  apply = jax.jit(unet.UNet(**converted.model).apply)  # one compile, not one per operation
  return np.asarray(apply({"params": converted.params}, x, t_model, y))


def iddpm_small_flags(arrays: dict, flags: dict) -> dict:
  """improved-diffusion flags of iddpm_small (its npz records UNetModel's arguments, which hold
  no image size: the reference ran on its inputs x [B, 32, 32, 3])."""
  return dict(
    image_size=arrays["x"].shape[1],
    num_heads=flags["num_heads"],
    diffusion_steps=flags["diffusion_steps"],
    rescale_timesteps=flags["rescale_timesteps"],
    learn_sigma=True,
  )


def test_improved_diffusion_parity():
  arrays, flags = reference("iddpm_small")
  converted = convert.convert(
    os.path.join(DATA, "iddpm_small.pt"),
    format="improved_diffusion",
    **iddpm_small_flags(arrays, flags),
  )
  assert converted.diffusion["rescale_timesteps"] and converted.diffusion["num_timesteps"] == 4000
  np.testing.assert_allclose(
    process.network_timesteps(DiffusionConfig(**converted.diffusion), jnp.asarray(arrays["t"])),
    arrays["t_model"],
  )
  error = np.abs(converted_output(converted, arrays["x"], arrays["t"]) - arrays["out"]).max()
  print(f"improved-diffusion iddpm_small: max abs error {error:.2e}")
  assert error < TOLERANCE
  assert converted.model["attn_resolutions"] == (16,) and converted.model["num_heads"] == 2
  assert converted.model["scale_shift_norm"] and converted.model["learn_sigma"]


# What each reference is there to exercise (tests/data/make_references.py builds them).
FEATURES = {
  "guided_updown_cond": dict(
    ch_mult=(1, 1, 2),
    attn_resolutions=(8, 4),
    num_head_channels=16,
    scale_shift_norm=True,
    resblock_updown=True,
    num_classes=10,
    learn_sigma=True,
  ),
  "guided_heads_plain": dict(
    num_res_blocks=2,
    attn_resolutions=(8,),
    num_heads=4,
    num_head_channels=None,
    scale_shift_norm=False,
    resblock_updown=False,
    learn_sigma=False,
  ),
  "pytorch_diffusion_small": dict(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)),
}


@pytest.mark.parametrize(
  "name, fmt",
  [
    ("guided_updown_cond", "guided_diffusion"),
    ("guided_heads_plain", "guided_diffusion"),
    ("pytorch_diffusion_small", None),
  ],
)
def test_guided_diffusion_and_pytorch_diffusion_parity(name, fmt):
  arrays, flags = reference(name)
  flags.pop("repo", None)
  converted = convert.convert(os.path.join(DATA, f"{name}.pt"), format=fmt, **flags)
  assert {k: converted.model[k] for k in FEATURES[name]} == FEATURES[name]
  error = np.abs(
    converted_output(converted, arrays["x"], arrays["t"], arrays.get("y")) - arrays["out"]
  ).max()
  print(f"{name}: max abs error {error:.2e}")
  assert error < TOLERANCE
  assert not converted.diffusion["rescale_timesteps"]  # guided-diffusion's default, and DDPM's


def test_guided_switches_are_read_from_the_tensors():
  _, flags = reference("guided_updown_cond")
  given = {
    k: v
    for k, v in flags.items()
    if k in ("image_size", "num_head_channels", "use_new_attention_order")
  }
  model = convert.convert(
    os.path.join(DATA, "guided_updown_cond.pt"), format="guided_diffusion", **given
  ).model
  assert model["resblock_updown"] and model["num_classes"] == 10 and model["learn_sigma"]
  assert model["ch_mult"] == (1, 1, 2) and model["attn_resolutions"] == (8, 4)


def test_the_qkv_order_matters():
  """Read in the legacy order, the new-order checkpoint gives another network: the test can tell."""
  arrays, flags = reference("guided_updown_cond")
  flags.pop("repo")
  converted = convert.convert(
    os.path.join(DATA, "guided_updown_cond.pt"),
    format="guided_diffusion",
    **{**flags, "use_new_attention_order": False},
  )
  out = converted_output(converted, arrays["x"], arrays["t"], arrays["y"])
  assert np.abs(out - arrays["out"]).max() > 100 * TOLERANCE


def test_flags_that_disagree_with_the_tensors_are_named():
  with pytest.raises(ConvertError, match=r"num_res_blocks=3 \(the checkpoint has 1\)"):
    convert.convert(
      os.path.join(DATA, "iddpm_small.pt"),
      format="improved_diffusion",
      image_size=32,
      num_res_blocks=3,
    )
  disagreement = r"attention_resolutions=16,8 \(the checkpoint has \[8\]\)"
  with pytest.raises(ConvertError, match=disagreement):
    convert.convert(
      os.path.join(DATA, "iddpm_small.pt"),
      format="improved_diffusion",
      image_size=16,
      attention_resolutions="16,8",
    )
  with pytest.raises(ConvertError, match="pass image_size"):
    convert.convert(os.path.join(DATA, "iddpm_small.pt"), format="improved_diffusion")
  with pytest.raises(ConvertError, match="improved_diffusion or guided_diffusion"):
    convert.convert(os.path.join(DATA, "iddpm_small.pt"), image_size=32)


def test_readme_flags_and_presets():
  flags = convert.parse_source_flags("--image_size 32 --learn_sigma True --dropout=0.3".split())
  assert flags == dict(image_size="32", learn_sigma="True", dropout="0.3")
  assert typed_flags(flags, openai_flags.FLAG_TYPES, "openai") == dict(
    image_size=32, learn_sigma=True, dropout=0.3
  )
  with pytest.raises(ConvertError, match=re.escape("guided-diffusion flag(s) ['imagesize']")):
    convert.convert(os.path.join(DATA, "iddpm_small.pt"), "improved_diffusion", imagesize="32")
  with pytest.raises(ConvertError, match="learn_sigma='maybe'"):
    convert.convert(os.path.join(DATA, "iddpm_small.pt"), "improved_diffusion", learn_sigma="maybe")
  with pytest.raises(ConvertError, match="expected --name value"):
    convert.parse_source_flags(["--image_size"])
  preset = openai_flags.preset_flags("improved", "cifar10_uncond_50M_500K")
  assert preset["diffusion_steps"] == 4000 and preset["step"] == 500_000
  assert openai_flags.repo_of_preset("64x64_diffusion") == "guided"


def test_preset_told_by_the_file_name(tmp_path):
  """A released file name selects its preset (and repo); here its flags contradict the tensors."""
  path = tmp_path / "cifar10_uncond_50M_500K.pt"
  path.write_bytes(open(os.path.join(DATA, "iddpm_small.pt"), "rb").read())
  with pytest.raises(ConvertError, match=r"num_channels=128 \(the checkpoint has 32\)"):
    convert.convert(str(path))


def _state(name: str) -> dict:
  return {k: torch.from_numpy(v) for k, v in weightfiles.load(os.path.join(DATA, name)).items()}


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda s: s.pop("input_blocks.1.0.out_layers.3.bias"),
      r"missing key\(s\): input_blocks.1.0.out_layers.3.bias \(32,\)",
    ),
    (
      lambda s: s.update({"input_blocks.1.0.extra.weight": torch.zeros(3)}),
      r"unexpected key\(s\): 'input_blocks.1.0.extra.weight'",
    ),
    (
      lambda s: s.update({"output_blocks.2.1.qkv.weight": torch.zeros(190, 64, 1)}),
      r"mis-shaped key\(s\): output_blocks.2.1.qkv.weight has shape \(190, 64, 1\), expected"
      r" \(192, 64, 1\)",
    ),
    (lambda s: s.pop("time_embed.0.weight"), "missing key time_embed.0.weight"),
  ],
)
def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, edit, message):
  state = _state("iddpm_small.pt")
  edit(state)
  torch.save(state, tmp_path / "edited.pt")
  with pytest.raises(ConvertError, match=message):
    convert.convert(
      str(tmp_path / "edited.pt"), format="improved_diffusion", image_size=32, num_heads=2
    )


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_file_that_runs_code_on_load_is_refused(tmp_path):
  marker = tmp_path / "ran"
  state = {**_state("pytorch_diffusion_small.pt"), "payload": _RunsCode(marker)}
  torch.save(state, tmp_path / "model-790000.ckpt")
  with pytest.raises(weightfiles.UnsafeWeightFileError, match="system"):
    convert.convert(str(tmp_path / "model-790000.ckpt"), preset="ema_cifar10")
  assert not marker.exists()


def test_the_library_imports_neither_torch_nor_diffusers():
  code = (
    "import sys; from diffusion_jax import convert; import launch.convert;"
    " print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
