"""Model definitions, data, preprocessing, checkpoints and training. Importing this package is cheap."""
