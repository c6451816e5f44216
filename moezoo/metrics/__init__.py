"""Evaluation metrics, one module per domain.

Modules (each owned by the family that adds it):

- ``moezoo.metrics.timeseries`` -- forecasting metrics (MSE/MAE on normalised series, ...).
- ``moezoo.metrics.diffusion`` -- image-generation metrics (FID-style scores, ...).
- ``moezoo.metrics.deweather`` -- image-restoration metrics (PSNR/SSIM, ...).

Import the domain module you need; this package imports nothing eagerly.
"""
