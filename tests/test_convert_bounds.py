"""Converters bound every architecture number of a foreign config before building, and quote its strings."""

import json

import numpy as np
import pytest

from diffusion_jax.convert import (
  ConvertError,
  diffusers_unet,
  mapping,
  openai_unet,
  pytorch_diffusion,
)

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\n"


def _diffusers_dir(tmp_path, **config):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))
  return str(tmp_path)


def _assert_one_short_line(message: str):
  """One printable line; at most 20 quoted keys of at most 200 characters, and the path."""
  assert message.isprintable() and len(message) < 20 * 200 + 300, message


@pytest.mark.parametrize(
  "config, message",
  [
    (
      dict(layers_per_block=10**8),
      r"layers_per_block 100000000 is out of bounds: expected integers"
      r" in \[1, 16\]",
    ),
    (
      dict(block_out_channels=[32] * 100),
      r"block_out_channels \[32, 32, .*\] is out of bounds:"
      r" expected integers in \[1, 8192\], at most 8 of them",
    ),
    (dict(block_out_channels=[32, 10**9]), r"block_out_channels \[32, 1000000000\] is out of"),
    (dict(sample_size="x" * 10**5), r"sample_size 'x+\.\.\.x+' is out of bounds"),
    (dict(in_channels=True), r"in_channels True is out of bounds"),
    (dict(num_class_embeds=10**12), r"num_class_embeds 1000000000000 is out of bounds"),
  ],
)
def test_diffusers_config_numbers_are_bounded_before_anything_is_built(tmp_path, config, message):
  with pytest.raises(ConvertError, match=message) as error:
    diffusers_unet.convert(_diffusers_dir(tmp_path, **config))  # no weight file: never reached
  _assert_one_short_line(str(error.value))


def test_diffusers_foreign_strings_are_quoted(tmp_path):
  with pytest.raises(ConvertError, match=r"setting\(s\) '\\x1b\[2J.*' and 5 more") as error:
    diffusers_unet.convert(_diffusers_dir(tmp_path, **{f"{ESCAPES}{i}": 1 for i in range(25)}))
  _assert_one_short_line(str(error.value))
  with pytest.raises(ConvertError, match=r"_class_name '\\x1b") as error:
    diffusers_unet.convert(_diffusers_dir(tmp_path, _class_name=ESCAPES * 100))
  _assert_one_short_line(str(error.value))


def test_diffusers_json_is_bounded(tmp_path):
  (tmp_path / "config.json").write_text("[" * 10**5 + "]" * 10**5)
  with pytest.raises(ConvertError, match="not JSON"):
    diffusers_unet.convert(str(tmp_path))
  (tmp_path / "config.json").write_text(" " * (2 << 20) + "{}")
  with pytest.raises(ConvertError, match=r"2097154 bytes; a diffusers config has at most 1048576"):
    diffusers_unet.convert(str(tmp_path))
  (tmp_path / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 10**9}))
  with pytest.raises(ConvertError, match=r"num_train_timesteps 1000000000 is out of bounds"):
    diffusers_unet.read_scheduler(str(tmp_path), str(tmp_path), learned=False)


@pytest.mark.parametrize(
  "flags, message",
  [
    (dict(num_res_blocks=10**8), r"num_res_blocks 100000000 is out of bounds"),
    (
      dict(image_size=1 << 20),
      r"image_size 1048576 is out of bounds: expected integers in"
      r" \[1, 4096\]",
    ),
    (dict(num_head_channels=-5), r"num_head_channels -5 is out of bounds"),
  ],
)
def test_openai_flags_are_bounded_before_the_file_is_read(flags, message):
  with pytest.raises(ConvertError, match=message):
    openai_unet.convert("/nonexistent.pt", repo="improved", flags=flags)


def test_architecture_read_from_tensors_is_bounded():
  """A state dict of shapes only (nothing allocated) asking for a 9000-channel U-Net."""
  shapes = {
    "conv_in.weight": (9000, 3, 3, 3),
    "conv_out.weight": (3, 9000, 3, 3),
    "down.0.block.0.conv1.weight": (9000, 9000, 3, 3),
  }
  state = mapping.StateDict(
    {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, "small.ckpt"
  )
  with pytest.raises(ConvertError, match=r"small.ckpt: ch 9000 is out of bounds"):
    pytorch_diffusion.convert("small.ckpt", flags={"resolution": 32}, state=state)


def test_unexpected_keys_are_quoted_and_counted():
  state = {f"{ESCAPES}{i}": np.zeros(1) for i in range(30)}
  with pytest.raises(ConvertError) as error:
    mapping.assemble({}, {}, state)
  message = str(error.value)
  assert message.isprintable() and "'\\x1b[2J" in message and message.endswith(" and 10 more")
