"""The PyTorch peers that benchmarks and parity tests run beside ours.

- diffusers' UNet2DModel twin of a zoo U-Net: the DDPM family and the Improved
  DDPM entries without BigGAN up/down blocks or class labels have an exact
  twin, its parameter count equal to ours (35,746,307 for ddpm_cifar10;
  tests/test_models.py holds the published counts).
- pytorch-fid's FID Inception and torch-fidelity, which import torchvision
  (`import_torchvision`), and random weights for the FID Inception's keys.
torch and diffusers come with `pip install -e ".[bench]"`, torch, pytorch-fid
and torch-fidelity with the `test` extra.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

from diffusion_jax.models import UNet


def import_peer():
  """(torch with one thread per core, None), or (None, why there is no PyTorch column)."""
  try:
    import torch  # noqa: PLC0415  (optional peer: the `bench` extra)

    if importlib.util.find_spec("torchvision"):  # diffusers' models import it when installed
      import_torchvision()
    import diffusers  # noqa: PLC0415
  except ImportError as e:
    return None, f"{e.name} is not installed (pip install -e '.[bench]')"
  diffusers.utils.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  return torch, None


def diffusers_kwargs(model: UNet, image_size: int, channels: int) -> dict:
  """UNet2DModel arguments that build `model`'s architecture on [image_size, image_size, channels].

  Raises:
    ValueError: for what UNet2DModel does not build the same way (BigGAN
      up/down blocks, class labels, one head count over several widths).
  """
  if model.resblock_updown or model.num_classes is not None:
    raise ValueError("no diffusers UNet2DModel equivalent of resblock_updown / num_classes")
  widths = [model.ch * mult for mult in model.ch_mult]
  sides = [image_size // 2**level for level in range(len(widths))]
  attends = [side in model.attn_resolutions for side in sides]
  attention_widths = {w for w, a in zip(widths, attends) if a} | {widths[-1]}
  if model.num_heads > 1 and len(attention_widths) > 1:
    raise ValueError(
      f"num_heads={model.num_heads} at widths {sorted(attention_widths)}: "
      "UNet2DModel takes one head size"
    )
  head_dim = model.num_head_channels or (
    widths[-1] // model.num_heads if model.num_heads > 1 else None
  )
  return dict(
    sample_size=image_size,
    in_channels=channels,
    out_channels=channels * (2 if model.learn_sigma else 1),
    block_out_channels=tuple(widths),
    layers_per_block=model.num_res_blocks,
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
    attention_head_dim=head_dim,  # None: one head as wide as the block
    dropout=model.dropout,
    norm_eps=model.norm_eps,
    downsample_padding=0 if model.downsample_padding == "SAME" else model.downsample_padding,
    flip_sin_to_cos=model.time_embedding == "adm",
    freq_shift=int(model.time_embedding == "ddpm"),
    resnet_time_scale_shift="scale_shift" if model.scale_shift_norm else "default",
  )


def diffusers_unet(model: UNet, image_size: int, channels: int):
  """diffusers' UNet2DModel twin of `model`, randomly initialised (see `diffusers_kwargs`)."""
  from diffusers import UNet2DModel  # noqa: PLC0415

  return UNet2DModel(**diffusers_kwargs(model, image_size, channels))


def count_torch_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


def import_torchvision():
  """torchvision, importable even where its C++ ops cannot load.

  PyPI's torchvision wheels are CUDA builds; beside the CPU build of torch
  they fail at import ("operator torchvision::nms does not exist") while
  registering fake kernels of two detection ops. Their schemas, defined here
  first, are all that import needs; the models (pure Python) work, the
  detection ops do not. pytorch_fid and torch_fidelity import torchvision:
  call this before importing them.
  """
  import torch  # noqa: PLC0415  (optional peer)

  try:
    import torchvision  # noqa: PLC0415
  except RuntimeError:
    for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
      del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.library = library  # the schemas live as long as the Library object
    import torchvision  # noqa: PLC0415
  return torchvision


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights for the FID Inception's keys (pytorch-fid's names), scaled so every layer matters.

  Convolutions He-normal (activations keep their scale through 90 layers), BN
  running statistics and affine terms away from (0, 1) so BN folding is
  exercised; `num_batches_tracked` kept, as in a real state dict.
  """
  torchvision = import_torchvision()
  shapes = torchvision.models.inception_v3(
    weights=None, num_classes=1008, aux_logits=False, init_weights=False
  ).state_dict()
  rng = np.random.default_rng(seed)
  draw = {
    "conv.weight": lambda s: rng.normal(0, np.sqrt(2 / np.prod(s[1:])), s),
    "bn.weight": lambda s: rng.uniform(0.5, 1.5, s),
    "bn.bias": lambda s: rng.normal(0, 0.1, s),
    "running_mean": lambda s: rng.normal(0, 0.1, s),
    "running_var": lambda s: rng.uniform(0.5, 1.5, s),
    "fc.weight": lambda s: rng.normal(0, 1 / np.sqrt(s[1]), s),
    "fc.bias": lambda s: rng.normal(0, 0.1, s),
    "num_batches_tracked": lambda s: np.zeros(s, np.int64),
  }
  state = {}
  for key, value in shapes.items():
    (maker,) = [make for suffix, make in draw.items() if key.endswith(suffix)]
    state[key] = np.asarray(maker(tuple(value.shape)), value.numpy().dtype)
  return state
