"""The torch-free edge runtime: ONNX exports run by onnxruntime alone (not written yet)."""
