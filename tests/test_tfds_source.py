"""TFDS datasets a user must prepare: prepared when they can be, one line saying how when not.

No test reaches the network: downloads are refused by a proxy on a closed local
port, or replaced by CIFAR-10-format files written here.
"""

import os
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def refused_proxy(monkeypatch) -> dict[str, str]:
  """Environment whose HTTP(S) proxy is a local port that refuses connections: offline anywhere."""
  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
      monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
      monkeypatch.delenv(name, raising=False)
    yield dict(os.environ)


@pytest.mark.parametrize(
  "config,dataset", [("cifar10_ddpm", "cifar10"), ("segmentation_pets", "oxford_iiit_pet")]
)
def test_train_on_an_unprepared_dataset_offline_is_one_line(
  tmp_path, refused_proxy, config, dataset
):
  """Diffusion and segmentation read TFDS through one source layer."""
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      f"--config=configs/{config}.py",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=180,  # TFDS's own retries take minutes
    env={**refused_proxy, "TFDS_DATA_DIR": str(data_dir)},
  )
  assert result.returncode == 1, result.stderr[-3000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith(
    f"launch.train: TFDS dataset '{dataset}' is not prepared in"
    f" {data_dir}, and it cannot be downloaded from here ("
  ), last_line
  assert f"`tfds build {dataset} --file_format=array_record --data_dir={data_dir}`" in last_line
  assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
  assert not os.listdir(data_dir)  # nothing half-prepared left behind


def test_manual_download_names_what_and_where(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError) as error:
    sources.tfds_source("celeb_a_hq/256", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
    f"TFDS dataset 'celeb_a_hq/256' is not prepared in {tmp_path}, and it"
    f" needs a manual download into {tmp_path}/downloads/manual: "
  )
  assert "data1024x1024.tar" in message  # TFDS's instructions: what to download
  assert message.endswith(
    f"Then run `tfds build celeb_a_hq/256 --file_format=array_record --data_dir={tmp_path}`."
  )


def test_unreachable_names_the_first_server_that_does_not_answer(refused_proxy, monkeypatch):
  # urlopen's shared opener as an earlier download in this process left it: built before
  # the proxy was set (CI's failure: the probe then asked DNS, not the environment's proxy).
  monkeypatch.setattr(
    urllib.request, "_opener", urllib.request.build_opener(urllib.request.ProxyHandler({}))
  )
  url = "https://example.com/data.tar.gz"
  reason = sources._unreachable([url, "https://example.com/other.tar.gz"])
  assert reason.startswith(f"{url}: ") and "refused" in reason


# ----------------------------------------------------------------------------- a real preparation


@pytest.fixture(scope="module")
def cifar_download(tmp_path_factory) -> str:
  """What CIFAR-10's download extracts to, in its binary format: 3 random images per file."""
  root = tmp_path_factory.mktemp("cifar_download")
  batches = root / "cifar-10-batches-bin"
  batches.mkdir()
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    label_then_CHW = np.concatenate(
      [rng.integers(0, 10, (3, 1)), rng.integers(0, 256, (3, 3 * 32 * 32))], axis=1
    )
    (batches / name).write_bytes(label_then_CHW.astype(np.uint8).tobytes())
  (batches / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))
  return str(root)


@pytest.fixture
def offline_cifar_download(monkeypatch, cifar_download):
  """TFDS's download of CIFAR-10 answered from `cifar_download`; its server 'answers'."""
  monkeypatch.setattr(
    tfds.download.DownloadManager, "download_and_extract", lambda self, url: cifar_download
  )
  monkeypatch.setattr(sources, "_unreachable", lambda urls: None)


def test_a_downloadable_dataset_is_prepared_as_array_record(tmp_path, offline_cifar_download):
  source = sources.tfds_source("cifar10", "train", data_dir=str(tmp_path))
  assert len(source) == 15  # 5 training files of 3 images
  record = source[4]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
  assert any(
    name.startswith("cifar10-train.array_record")
    for name in os.listdir(tmp_path / "cifar10" / "3.0.2")
  )
  assert len(sources.tfds_source("cifar10", "test", data_dir=str(tmp_path))) == 3  # reused


def test_a_dataset_prepared_as_tfrecord_is_one_line(tmp_path, offline_cifar_download):
  tfds.builder("cifar10", data_dir=str(tmp_path)).download_and_prepare(file_format="tfrecord")
  with pytest.raises(
    sources.DatasetUnavailableError,
    match=(
      r"^TFDS dataset 'cifar10' in .*/cifar10/3\.0\.2 is stored as tfrecord files, which cannot"
      r" be read by index: write it again as ArrayRecord with `tfds build cifar10"
      rf" --file_format=array_record --data_dir={tmp_path} --overwrite`$"
    ),
  ):
    sources.tfds_source("cifar10", "train", data_dir=str(tmp_path))
