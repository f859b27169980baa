"""What MLflow stores with a shipped model: `onnx_scores.py` is an MLflow "model from code" (its source is
copied into the model, no pickle) so that an ONNX variant's `predict` returns the same array of class scores as
a torch variant's."""
