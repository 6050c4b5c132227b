"""The classic U-Net on Oxford-IIIT Pet's trimaps (TFDS oxford_iiit_pet): pet, background, outline.

    tfds build oxford_iiit_pet --file_format=array_record   # once, online
    python -m launch.train --config=configs/segmentation_pets.py --workdir=workdirs/pets

The cells config's network, loss and augmentation on RGB photographs whose
short side is scaled to 160 pixels; 3 classes. `:smoke` runs in seconds.
"""

import ml_collections

from configs import segmentation_cells


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = segmentation_cells.get_config(variant)
  config.data.update(
    source="tfds",
    name="oxford_iiit_pet",  # 3,680 training and 3,669 test photographs with trimaps
    image_key="image",
    mask_key="segmentation_mask",  # 1 pet, 2 background, 3 outline ...
    mask_offset=1,  # ... as classes 0, 1, 2
    eval_images=64,  # the first 64 test images are evaluated
    num_channels=3,  # RGB
    resize=160,  # pixels: each photograph's short side
  )
  config.model.update(num_classes=3, features=16)  # pet, background, outline
  config.weight_map.background_class = 1  # objects: the connected pet (and outline) regions
  config.augment.max_rotation = 15.0  # degrees: pets are photographed upright
  if "smoke" not in variant:
    config.train.update(
      batch_size=8, num_steps=20_000, checkpoint_every=2000, eval_every=2000, log_every=100
    )
  return config
