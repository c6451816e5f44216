"""Dataset and data-loading helpers, one module per domain.

Modules (each owned by the family that adds it):

- ``moezoo.data.timeseries`` -- ETT-style CSV windows, normalisation.
- ``moezoo.data.diffusion`` -- image datasets (Fashion-MNIST, ...) for diffusion training.
- ``moezoo.data.deweather`` -- paired degraded/clean image datasets and augmentations.

Import the domain module you need; this package imports nothing eagerly.
The shared training loop that consumes these datasets is :mod:`moezoo.trainer`.
"""
