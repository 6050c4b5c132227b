"""The entry points. Importing the package quiets TensorFlow's start-up log before a launcher imports it."""

from diffusion_jax import logs

logs.quiet_tensorflow()
