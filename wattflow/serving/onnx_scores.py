"""An MLflow pyfunc model from code: ONNX Runtime on the artifact "onnx", returning the scores array.

MLflow copies this file into the logged model and runs it at load time (models from code: no pickled object),
so it imports only what the serving environment has: mlflow, numpy, onnxruntime.
"""

import warnings

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.pyfunc import PythonModel

# MLflow suggests type hints on predict for automatic signatures; the logged model's signature is explicit.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


class OnnxScores(PythonModel):
    def load_context(self, context):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(context.artifacts["onnx"], options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input)
        x = x.astype(np.float32 if "float" in self.input.type else np.int64, copy=False)
        return self.session.run(None, {self.input.name: np.ascontiguousarray(x)})[0]


mlflow.models.set_model(OnnxScores())
