"""Scoring a decomposition: the metrics (PSNR, IoU, alpha errors) and the
evaluation of an output folder against a clip's truth."""
