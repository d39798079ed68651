"""The peers of ``smartbin-bench-peers``: what a user would run instead of ``smartbin-serve``
(a FastAPI REST service, ONNX Runtime), the bare pipeline as the floor, and the float32
model's translation to ONNX. Installed with the tools' ``peers`` extra; never on a bin."""
