"""Makes tests/data/NAME.{pt,npz} by running the original PyTorch code (not part of the tests).

    git clone https://github.com/openai/improved-diffusion /tmp/improved
    git -C /tmp/improved checkout 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5
    git clone https://github.com/openai/guided-diffusion /tmp/guided
    git -C /tmp/guided checkout 22e0df8183507e13a7813f8d38d51b072ca1e67c
    git clone https://github.com/pesser/pytorch_diffusion /tmp/pytorch_diffusion
    git -C /tmp/pytorch_diffusion checkout 304bdff2196db604fb66108b0bb2d4a19058b20f
    python tests/data/make_references.py --improved_diffusion=/tmp/improved \
        --guided_diffusion=/tmp/guided --pytorch_diffusion=/tmp/pytorch_diffusion

`--only=NAME` (repeatable) makes one case and needs only its repository's
checkout; `--out=DIR` writes elsewhere than tests/data. Needs torch (CPU) and
NumPy only. Every case is made alone from torch seed 0, in this order:
  1. build the network the case's settings describe (which draws its default
     initialisation from the seeded generator);
  2. overwrite every parameter, in `named_parameters` order, from the same
     generator: "uniform" draws matrices (ndim >= 2) uniform in
     +-1/sqrt(fan-in), norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1);
     "normal" (iddpm_small's) draws matrices N(0, 1/fan-in), vectors N(0, 1).
     Either way no zero-initialised layer hides a mapping error;
  3. draw the inputs x [B, 3, H, W]: torch.randn right after the parameters, or
     for iddpm_small NumPy's default_rng(1) (drawn [B, H, W, 3]);
  4. run the network in eval mode, float32, on x and the case's timesteps t
     (and labels y);
  5. save the state dict (`torch.save`) as NAME.pt and, with `np.savez`,
     NAME.npz: x and out NHWC, t, y (class-conditional cases), t_model
     (what a rescale_timesteps network is fed) and `flags` (JSON).
The .pt files come out byte for byte the same on any machine; `out` can move
in the last bits with torch's kernels, far below the tests' 1e-4.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import torch

COMMITS = {
    "improved": "1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5",
    "guided": "22e0df8183507e13a7813f8d38d51b072ca1e67c",
    "pytorch_diffusion": "304bdff2196db604fb66108b0bb2d4a19058b20f",
}
FLAGS = {"improved": "improved_diffusion", "guided": "guided_diffusion",
         "pytorch_diffusion": "pytorch_diffusion"}  # the command-line flag of each checkout
# guided-diffusion's script_util hard-codes NUM_CLASSES = 1000 (ImageNet); 10 keeps label_emb small.
GUIDED_NUM_CLASSES = 10
# improved-diffusion UNetModel arguments among an iddpm case's flags (the rest are diffusion's).
_IMPROVED_UNET_ARGS = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                       "attention_resolutions", "dropout", "channel_mult", "num_classes",
                       "num_heads", "use_scale_shift_norm")


@dataclasses.dataclass(frozen=True)
class Case:
  """One reference network and its inputs.

  `flags` go into the npz as they are. For "guided" they are guided-diffusion's
  command-line flags (over `model_and_diffusion_defaults`); for "improved" the
  UNetModel arguments plus diffusion_steps and rescale_timesteps; for
  "pytorch_diffusion" only the resolution, the one setting its converter needs:
  the network's `Model` arguments are `model`.
  """
  repo: str  # "improved", "guided" or "pytorch_diffusion": the checkout that builds it
  flags: dict[str, Any]
  t: tuple[int, ...]  # diffusion timesteps, one per image: B = len(t)
  image_size: int
  y: tuple[int, ...] | None = None  # class labels, for class-conditional networks
  init: str = "uniform"  # how parameters are drawn: "uniform" or "normal" (module docstring)
  model: dict[str, Any] | None = None  # pytorch_diffusion `Model` arguments


CASES: dict[str, Case] = {
    # The improved-diffusion reference first kept in ../shared/ref (hence its own draws).
    "iddpm_small": Case(
        repo="improved", init="normal", t=(10, 3999), image_size=32,
        flags=dict(repo="improved", diffusion_steps=4000, rescale_timesteps=True, in_channels=3,
                   model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=[2], dropout=0.0, channel_mult=[1, 2, 2],
                   num_classes=None, num_heads=2, use_scale_shift_norm=True)),
    # AdaGN, BigGAN up/down residual blocks, classes, learned variance, heads of 16 channels in
    # the new qkv order, attention at two resolutions and a level that widens.
    "guided_updown_cond": Case(
        repo="guided", t=(0, 417, 999), y=(3, 0, 9), image_size=16,
        flags=dict(repo="guided", image_size=16, num_channels=32, num_res_blocks=1,
                   attention_resolutions="8,4", channel_mult="1,1,2", class_cond=True,
                   learn_sigma=True, num_head_channels=16, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=True, diffusion_steps=1000,
                   noise_schedule="linear")),
    # Plain GroupNorm, conv up/down sampling, 4 heads in the legacy qkv order, two blocks a level.
    "guided_heads_plain": Case(
        repo="guided", t=(5, 731), image_size=16,
        flags=dict(repo="guided", image_size=16, num_channels=32, num_res_blocks=2,
                   channel_mult="1,1", num_heads=4, attention_resolutions="8",
                   use_scale_shift_norm=False, learn_sigma=False, diffusion_steps=1000,
                   noise_schedule="linear")),
    # DDPM's network: attention and a wider level at 8x8, nin_shortcut both ways.
    "pytorch_diffusion_small": Case(
        repo="pytorch_diffusion", t=(0, 999), image_size=16, flags=dict(resolution=16),
        model=dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=0.0, resamp_with_conv=True, in_channels=3, resolution=16)),
}


def check_commit(path: str, repo: str) -> None:
  """Fails unless a git checkout at `path` is at COMMITS[repo] (an unpacked archive is trusted)."""
  if not os.path.exists(os.path.join(path, ".git")):
    print(f"{path}: not a git checkout; taking it to be {repo} at {COMMITS[repo]}")
    return
  head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  if head != COMMITS[repo]:
    raise SystemExit(f"{path}: {repo} checkout is at {head}, the references need {COMMITS[repo]}")


def load_source(repo: str, path: str) -> Any:
  """The module that builds `repo`'s network, imported from the checkout at `path`."""
  if repo == "pytorch_diffusion":
    # Only model.py: the package's __init__ imports the checkpoint downloader (requests, tqdm).
    spec = importlib.util.spec_from_file_location(
        "pytorch_diffusion_model", os.path.join(path, "pytorch_diffusion", "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  sys.path.insert(0, path)
  if repo == "improved":
    from improved_diffusion import unet  # pylint: disable=import-outside-toplevel
    return unet
  from guided_diffusion import script_util  # pylint: disable=import-outside-toplevel
  script_util.NUM_CLASSES = GUIDED_NUM_CLASSES
  return script_util


def build(case: Case, source: Any) -> torch.nn.Module:
  """The case's network, built by the original code (from whatever state the generator is in)."""
  if case.repo == "improved":
    return source.UNetModel(**{k: case.flags[k] for k in _IMPROVED_UNET_ARGS})
  if case.repo == "guided":
    settings = source.model_and_diffusion_defaults()
    unknown = set(case.flags) - set(settings) - {"repo"}
    if unknown:
      raise SystemExit(f"guided-diffusion has no flag(s) {sorted(unknown)}")
    settings.update({k: v for k, v in case.flags.items() if k != "repo"})
    return source.create_model_and_diffusion(**settings)[0]
  return source.Model(**case.model)


def draw_parameters(model: torch.nn.Module, init: str) -> None:
  """Overwrites every parameter from torch's global generator, as the module docstring says."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      fan_in = p[0].numel() if p.ndim >= 2 else 0
      if init == "normal":
        p.normal_(0, 1 / math.sqrt(fan_in) if fan_in else 1)
      elif fan_in:
        p.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
      elif name.endswith("weight"):  # a GroupNorm scale: every 1-D weight in these networks
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))


def inputs(case: Case) -> torch.Tensor:
  """x [B, 3, H, W] of the case, drawn right after its parameters."""
  shape = (len(case.t), 3, case.image_size, case.image_size)
  if case.init == "normal":
    nhwc = np.random.default_rng(1).standard_normal((shape[0], *shape[2:], shape[1]))
    return torch.from_numpy(nhwc.astype(np.float32)).permute(0, 3, 1, 2)
  return torch.randn(shape)


def network_timesteps(case: Case) -> np.ndarray | None:
  """What a rescale_timesteps network is fed, t * 1000 / T (float64), or None."""
  if not case.flags.get("rescale_timesteps"):
    return None
  return np.asarray(case.t, np.float64) * (1000.0 / case.flags["diffusion_steps"])


def make(name: str, case: Case, source: Any, out_dir: str) -> None:
  """Builds, draws, runs and saves one case."""
  torch.manual_seed(0)
  model = build(case, source)
  draw_parameters(model, case.init)
  x = inputs(case)
  t_model = network_timesteps(case)
  t = torch.tensor(case.t) if t_model is None else torch.from_numpy(t_model)
  extra = {} if case.y is None else {"y": torch.tensor(case.y)}
  model.eval()
  with torch.no_grad():
    out = model(x, t, **extra)
  torch.save(model.state_dict(), os.path.join(out_dir, f"{name}.pt"))
  arrays = dict(x=x.permute(0, 2, 3, 1).numpy(), t=np.asarray(case.t, np.int64))
  if t_model is not None:
    arrays["t_model"] = t_model
  arrays.update(out=out.permute(0, 2, 3, 1).numpy(), flags=np.array(json.dumps(case.flags)))
  if case.y is not None:
    arrays["y"] = np.asarray(case.y, np.int64)
  np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
  count = sum(p.numel() for p in model.parameters())
  print(f"wrote {name}.pt ({count} parameters) and {name}.npz (out {tuple(arrays['out'].shape)})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for repo, flag in FLAGS.items():
    parser.add_argument(f"--{flag}", dest=repo, metavar="PATH", help=f"checkout at {COMMITS[repo]}")
  parser.add_argument("--only", action="append", choices=sorted(CASES),
                      help="make only this case (repeatable); default: all")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  names = args.only or list(CASES)
  repos = sorted({CASES[name].repo for name in names})
  missing = [f"--{FLAGS[repo]}" for repo in repos if not getattr(args, repo)]
  if missing:
    parser.error(f"making {', '.join(names)} needs {' and '.join(missing)}")
  sources = {}
  for repo in repos:
    check_commit(getattr(args, repo), repo)
    sources[repo] = load_source(repo, getattr(args, repo))
  for name in names:
    make(name, CASES[name], sources[CASES[name].repo], args.out)


if __name__ == "__main__":
  main()
