"""The float32 .tflite as an ONNX model: the same graph and the same weights, for ONNX Runtime.

No tool on PyPI does this without TensorFlow for the converter's models: tflite2onnx (0.4.1,
2022) stops at their FULLY_CONNECTED (``keep_num_dims``) and then at the layout of the
normalisation ahead of the stem's explicit TRANSPOSE, PAD, TRANSPOSE. The converter's float32
models use nine kinds of op, so they are translated here one by one, reading the .tflite with
LiteRT's own flatbuffer schema. Any other op, or a quantized tensor, is refused by name.

Layout: TFLite computes in NHWC, ONNX Runtime's convolutions in NCHW. Every 4-D tensor of the
.tflite is held in the ONNX graph as its NCHW transpose, the input transposed once on the way
in; the model's own TRANSPOSE and PAD ops are rewritten for that, so the stem's padding stays
where the converter put it. :func:`max_difference` checks the outcome against LiteRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.tools import flatbuffer_utils
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# ONNX Runtime 1.14 and later read IR version 8 (opset 17 needs it).
IR_VERSION = 8
# Where a 4-D NHWC tensor's axes are in its NCHW form, and back.
TO_NCHW = (0, 3, 1, 2)
TO_NHWC = (0, 2, 3, 1)
DTYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.INT64: np.int64,
}
OP_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


class ExportError(ValueError):
    """The .tflite has something this translation does not cover."""


class _Graph:
    """The ONNX graph being built from one TFLite subgraph."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.subgraphs[0]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def tensor(self, index: int) -> Any:
        return self.graph.tensors[index]

    def shape(self, index: int) -> list[int]:
        return [int(d) for d in self.tensor(index).shape]

    def constant(self, index: int) -> np.ndarray | None:
        """A constant tensor's value (weights, bias, shape), None for an activation."""
        tensor = self.tensor(index)
        data = self.model.buffers[tensor.buffer].data
        if data is None or not len(data):
            return None
        if tensor.type not in DTYPES:
            raise ExportError(f"tensor {tensor.name!r} has TFLite type {tensor.type}")
        raw = np.asarray(data, dtype=np.uint8).tobytes()
        return np.frombuffer(raw, DTYPES[tensor.type]).reshape(self.shape(index)).copy()

    def name(self, index: int) -> str:
        return f"t{index}"

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def init(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))

    def operand(self, index: int, rank: int) -> str:
        """An elementwise operand: an activation as it is held, a constant in the held layout
        of the ``rank``-D tensor it is combined with."""
        value = self.constant(index)
        if value is None:
            return self.name(index)
        if rank == 4 and value.ndim == 4:
            value = value.transpose(TO_NCHW)
        elif rank == 4 and value.ndim == 1 and value.size > 1:
            value = value.reshape(1, -1, 1, 1)  # per channel: the last NHWC axis
        return self.init(value.astype(np.float32), "c")

    def activation(self, fused: int, result: str, output: str) -> None:
        """The op's fused activation from ``result`` to ``output``."""
        act = schema.ActivationFunctionType
        if fused == act.NONE:
            self.node("Identity", [result], [output])
        elif fused == act.RELU:
            self.node("Relu", [result], [output])
        elif fused == act.RELU6:
            low = self.init(np.array(0, np.float32), "zero")
            high = self.init(np.array(6, np.float32), "six")
            self.node("Clip", [result, low, high], [output])
        else:
            raise ExportError(f"fused activation {fused} is not covered")


def _held_perm(perm: list[int]) -> list[int]:
    """The permutation of held (NCHW) tensors that does ``perm`` to the NHWC tensors."""
    logical = [TO_NHWC[j] for j in perm]  # held -> NHWC, then perm
    return [logical[j] for j in TO_NCHW]  # then NHWC -> held


def _translate(g: _Graph, op: Any) -> None:
    name = OP_NAMES.get(
        max(
            g.model.operatorCodes[op.opcodeIndex].builtinCode,
            g.model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode,
        ),
        "CUSTOM",
    )
    inputs, output = list(op.inputs), op.outputs[0]
    options = op.builtinOptions
    out = g.name(output)
    rank = len(g.shape(output))
    if name in ("ADD", "SUB", "MUL"):
        result = g.fresh(name.lower())
        g.node(name.capitalize(), [g.operand(i, rank) for i in inputs], [result])
        g.activation(options.fusedActivationFunction, result, out)
    elif name == "TRANSPOSE":
        perm = [int(p) for p in g.constant(inputs[1])]  # type: ignore[union-attr]
        held = _held_perm(perm) if len(perm) == 4 else perm
        g.node("Transpose", [g.name(inputs[0])], [out], perm=held)
    elif name == "PAD":
        paddings = g.constant(inputs[1])
        assert paddings is not None
        if len(paddings) == 4:
            paddings = paddings[list(TO_NCHW)]
        pads = np.concatenate([paddings[:, 0], paddings[:, 1]]).astype(np.int64)
        g.node("Pad", [g.name(inputs[0]), g.init(pads, "pads")], [out], mode="constant")
    elif name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        weights = g.constant(inputs[1])
        if weights is None:
            raise ExportError(f"{name} with weights computed at run time is not covered")
        if name == "CONV_2D":
            kernel, group = weights.transpose(0, 3, 1, 2), 1  # OHWI -> OIHW
        else:
            kernel = weights.transpose(3, 0, 1, 2)  # 1HW(C*M) -> (C*M)1HW
            group = g.shape(inputs[0])[3]
        names = [g.name(inputs[0]), g.init(kernel, "w")]
        if len(inputs) > 2 and inputs[2] >= 0:
            names.append(g.init(g.constant(inputs[2]), "b"))  # type: ignore[arg-type]
        padding = schema.Padding
        result = g.fresh("conv")
        g.node(
            "Conv",
            names,
            [result],
            strides=[options.strideH, options.strideW],
            dilations=[options.dilationHFactor, options.dilationWFactor],
            group=group,
            # TensorFlow's SAME puts the odd pixel of padding after: ONNX's SAME_UPPER.
            auto_pad="SAME_UPPER" if options.padding == padding.SAME else "VALID",
        )
        g.activation(options.fusedActivationFunction, result, out)
    elif name == "MEAN":
        axes = sorted(int(a) for a in g.constant(inputs[1]))  # type: ignore[union-attr]
        if len(g.shape(inputs[0])) != 4 or axes != [1, 2]:
            raise ExportError(f"MEAN over axes {axes} is not covered, only the spatial ones")
        g.node(
            "ReduceMean",
            [g.name(inputs[0])],
            [out],
            axes=[2, 3],
            keepdims=int(bool(options.keepDims)),
        )
    elif name == "FULLY_CONNECTED":
        if len(g.shape(inputs[0])) != 2:
            raise ExportError("FULLY_CONNECTED on other than a batch of vectors is not covered")
        names = [g.name(inputs[0]), g.operand(inputs[1], 2)]
        if len(inputs) > 2 and inputs[2] >= 0:
            names.append(g.operand(inputs[2], 2))
        result = g.fresh("fc")
        g.node("Gemm", names, [result], transB=1)
        g.activation(options.fusedActivationFunction, result, out)
    else:
        raise ExportError(f"{name} is not covered by this translation")


def tflite_to_onnx(path: Path) -> onnx.ModelProto:
    """The float32 .tflite at ``path`` as an ONNX model with the same input and output.

    Raises:
        ExportError: an op, tensor type or option the translation does not cover.
    """
    model = flatbuffer_utils.read_model(str(path))
    if len(model.subgraphs) != 1:
        raise ExportError(f"{path.name} has {len(model.subgraphs)} subgraphs, not one")
    g = _Graph(model)
    graph_inputs, graph_outputs = [], []
    for index in g.graph.inputs:
        if g.tensor(index).type != schema.TensorType.FLOAT32:
            raise ExportError(f"{path.name} takes {g.tensor(index).type}: only float32 models")
        shape = g.shape(index)
        graph_inputs.append(helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape))
        if len(shape) == 4:
            g.node("Transpose", ["pixels"], [g.name(index)], perm=list(TO_NCHW))
        else:
            g.node("Identity", ["pixels"], [g.name(index)])
    for op in g.graph.operators:
        _translate(g, op)
    for number, index in enumerate(g.graph.outputs):
        shape = g.shape(index)
        name = f"output_{number}"
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        if len(shape) == 4:
            g.node("Transpose", [g.name(index)], [name], perm=list(TO_NHWC))
        else:
            g.node("Identity", [g.name(index)], [name])
    onnx_model = helper.make_model(
        helper.make_graph(g.nodes, "smartbin", graph_inputs, graph_outputs, g.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="smartbin_tools.peers.onnx_export",
    )
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model)
    return onnx_model


def export(tflite: Path, out: Path) -> Path:
    """Write ``tflite`` as ONNX to ``out`` (once: an existing file is kept) and return it."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        partial.write_bytes(tflite_to_onnx(tflite).SerializeToString())
        partial.replace(out)
    return out


def max_difference(tflite: Path, onnx_path: Path, pixels: np.ndarray) -> float:
    """The largest difference between the two models' outputs for one NHWC float32 input."""
    import onnxruntime

    interpreter = Interpreter(model_path=str(tflite), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    expected = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": pixels})
    return float(np.abs(np.asarray(got) - expected).max())
