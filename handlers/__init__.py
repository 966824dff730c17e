"""What is served: pure request pipelines (requests, image, text, settings) and their TorchServe adapters."""
