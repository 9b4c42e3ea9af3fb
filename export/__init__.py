"""ONNX export of a loaded model into an app-ready folder, and its verification against torch."""
