"""Evaluation metrics, one module per domain (import the one you need; nothing is imported eagerly).

- :mod:`moezoo.metrics.timeseries` -- MSE / MAE averaged over channels.
- :mod:`moezoo.metrics.generation` -- FID / IS / precision-recall, classifier-space FID, conditional accuracy, routing analysis.
- :mod:`moezoo.metrics.restoration` -- PSNR / SSIM per weather type and overall.
"""
