"""Export (TorchScript trace/script, ONNX), verification against eager, and archiving into a .mar."""
