"""An ONNX file run by ONNX Runtime on CPU (format "onnx"), logged as an MLflow pyfunc model from code
(`wattflow/serving/onnx_scores.py`: no pickled object) that returns the scores array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wattflow.runtimes import RUNTIMES, Param, Predictor, Runtime, pip_requirements

SCORES_CODE = Path(__file__).resolve().parent.parent / "serving" / "onnx_scores.py"

# op type -> (input slot of a weight or bias, input slot of its zero point or None, channel axis of that zp)
_PARAM_SLOTS = {
    "Conv": ((1, None, 0), (2, None, 0)), "Gemm": ((1, None, 0), (2, None, 0)),
    "MatMul": ((0, None, 0), (1, None, 0)),
    "Add": ((0, None, 0), (1, None, 0)),  # the bias after MatMulInteger/ConvInteger
    "QLinearConv": ((3, 5, 0), (8, None, 0)), "QGemm": ((3, 5, 0), (6, None, 0)),
    "QLinearMatMul": ((3, 5, 1),), "ConvInteger": ((1, 3, 0),), "MatMulInteger": ((1, 3, 1),),
}
_PASS_THROUGH = ("Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze")


def _session(path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_dtype(session) -> type:
    return np.float32 if "float" in session.get_inputs()[0].type else np.int64


@RUNTIMES.register("onnx")
class OnnxRuntime(Runtime):
    def predictor(self, path, threads: int = 1, compile: bool = True, device: str = "cpu") -> Predictor:
        if device != "cpu":
            from wattflow.compress.quantize import BackendUnavailable
            raise BackendUnavailable(f"ONNX Runtime here runs on the CPU only, not on {device!r}")
        session = _session(path, threads)
        input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
        dtype = _input_dtype(session)

        def predict(x: np.ndarray) -> np.ndarray:
            out = session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=dtype)})[0]
            return out.astype(np.float32, copy=False)

        return predict

    def params(self, path) -> list[Param]:
        """The initializers that feed a weight or bias input of a compute op (Conv, Gemm, MatMul, Add and their
        QLinear/QGemm/Integer forms), directly or through a DequantizeLinear/Reshape/Transpose/Cast. Scales,
        zero points and shape constants are not parameters; a quantized weight is zero at its zero point."""
        import onnx
        from onnx import helper, numpy_helper

        graph = onnx.load(str(path)).graph
        inits = {i.name: i for i in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        found: dict[str, tuple[str, int]] = {}  # initializer -> (its zero point initializer or "", channel axis)

        def trace(name: str, zp_name: str, axis: int) -> None:
            while name not in inits and name in producer:
                node = producer[name]
                if node.op_type == "DequantizeLinear":
                    zp_name = node.input[2] if len(node.input) > 2 else ""
                    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
                elif node.op_type not in _PASS_THROUGH:
                    return  # computed from activations: not a stored parameter
                name = node.input[0]
            if name in inits:
                found.setdefault(name, (zp_name, axis))

        for node in graph.node:
            for slot, zp_slot, axis in _PARAM_SLOTS.get(node.op_type, ()):
                if slot < len(node.input) and node.input[slot]:
                    zp = node.input[zp_slot] if zp_slot is not None and zp_slot < len(node.input) else ""
                    trace(node.input[slot], zp, axis)
        params: list[Param] = []
        for name, (zp_name, axis) in found.items():
            values = numpy_helper.to_array(inits[name])
            zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else np.zeros(())
            if zp.size > 1:  # per-channel: line the zero points up with their channel axis
                shape = [1] * values.ndim
                shape[axis] = zp.size
                zp = zp.reshape(shape)
            params.append((values, zp.astype(values.dtype), int(values.nbytes)))
        return params

    def log_model(self, path) -> None:
        import mlflow
        from mlflow.models import infer_signature

        session = _session(path)
        spec_in = session.get_inputs()[0]
        example = np.zeros([2, *spec_in.shape[1:]], dtype=_input_dtype(session))
        output = session.run(None, {spec_in.name: example})[0]
        mlflow.pyfunc.log_model(name="model", python_model=str(SCORES_CODE), artifacts={"onnx": str(path)},
                                input_example=example, signature=infer_signature(example, output),
                                pip_requirements=pip_requirements("onnx", "onnxruntime"))
