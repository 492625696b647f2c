"""mdeploy: take trained MobileNets to phones (ONNX, TFLite, CoreML) with proven int8 parity."""

__version__ = "0.1.0"
