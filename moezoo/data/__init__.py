"""Dataset and data-loading helpers, one module per domain (import the one you need; nothing is imported eagerly).

- :mod:`moezoo.data.timeseries` -- CSV/parquet series, standard long-horizon splits, scaler, training/eval windows.
- :mod:`moezoo.data.images` -- Fashion-MNIST (Debian package), sklearn digits, ImageNet-style folders, VAE latents.
- :mod:`moezoo.data.weather` -- a real multi-weather set synthesised offline with albumentations; All-Weather loaders.

The shared training loop that consumes these datasets is :mod:`moezoo.trainer`.
"""
