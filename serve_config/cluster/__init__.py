"""Deployment past one host: the container image, the Kubernetes and KServe manifests and the model bundle."""
