"""Segmentation with the classic U-Net (Ronneberger et al. 2015): a task of the training loop.

It shares the train state, the optimizer and the finiteness guard of train/state.py with
the diffusion task, and its config sections live in diffusion_jax/config/segmentation.py.

  synthetic   touching synthetic cells, offline and seeded
  sources     image/mask pairs: cells, TFDS, folders; bad pairs named
  weights     the loss's weight map (Sec. 3, eq. 2)
  augment     shifts, rotations, elastic deformations, intensity (Sec. 3.1)
  data        the input pipeline: pairs -> weight maps -> augmented tiles -> batches
  step        the weighted pixel-wise cross-entropy (eq. 1) and the train step
  tiling      overlap-tile inference with mirrored context (Fig. 2)
  metrics     pixel accuracy, IoU, merged objects, image | truth | prediction panels
  experiment  a config made concrete: the task (train/task.py) the loop runs for config.task
  inference   a trained run's checkpoint applied to image files (launch.segment)
"""
