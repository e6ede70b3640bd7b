"""A small writer of TFLite flatbuffers (schema version 3), built on the `tflite` schema package.

The exporter (`models.tflite_export`) describes a graph as tensors and operators; this module owns the
file format: buffer 0 is the empty sentinel the runtime expects, every constant gets its own buffer
with 16-byte aligned data (so the runtime and XNNPACK can read weights in place), operator codes are
deduplicated, and the file carries the "TFL3" identifier. No TensorFlow is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import flatbuffers
import numpy as np
import tflite

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16
# Builtin codes above 127 do not fit the legacy int8 field, which then holds this placeholder.
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127

_TENSOR_TYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): tflite.TensorType.FLOAT32,
    np.dtype(np.int32): tflite.TensorType.INT32,
    np.dtype(np.int64): tflite.TensorType.INT64,
    np.dtype(np.int8): tflite.TensorType.INT8,
}

# Writes one builtin-options table into the flatbuffer and returns its offset.
OptionsWriter = Callable[[flatbuffers.Builder], int]


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: real = scale * (q - zero_point), per `axis` when per-channel."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 0


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: int
    shape_signature: tuple[int, ...] | None
    is_variable: bool
    quantization: Quantization | None


@dataclass
class _Operator:
    opcode: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options_type: int
    options: OptionsWriter | None


@dataclass
class GraphBuilder:
    """Collects one subgraph's tensors and operators, then serializes the whole model.

    Tensor ids are positions in the subgraph's tensor list, as the operators reference them; -1 marks
    an omitted optional operator input.
    """

    name: str = "main"
    _tensors: list[_Tensor] = field(default_factory=list)
    _operators: list[_Operator] = field(default_factory=list)
    _buffers: list[bytes] = field(default_factory=lambda: [b""])  # buffer 0: the empty sentinel
    _opcodes: dict[int, int] = field(default_factory=dict)  # builtin code -> index in operator_codes

    def constant(self, name: str, array: np.ndarray, quantization: Quantization | None = None) -> int:
        """A read-only tensor holding `array` (float32, int32, int64 or int8)."""
        data = np.asarray(array)
        dtype = np.dtype(data.dtype.name)  # native byte order, so it matches the type table
        self._check_dtype(name, dtype)
        self._buffers.append(np.ascontiguousarray(data, dtype=dtype.newbyteorder("<")).tobytes())
        buffer = len(self._buffers) - 1
        return self._add(_Tensor(name, data.shape, dtype, buffer, None, False, quantization))

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: np.dtype | type = np.float32,
        *,
        dynamic_batch: bool = False,
        is_variable: bool = False,
    ) -> int:
        """An activation (or, with `is_variable`, state) tensor; `dynamic_batch` marks dim 0 as -1."""
        dtype = np.dtype(dtype)
        self._check_dtype(name, dtype)
        shape = tuple(int(d) for d in shape)
        signature = (-1, *shape[1:]) if dynamic_batch and shape else None
        # Variable tensors need a buffer of their own for the runtime to attach state to.
        buffer = 0
        if is_variable:
            self._buffers.append(b"")
            buffer = len(self._buffers) - 1
        return self._add(_Tensor(name, shape, dtype, buffer, signature, is_variable, None))

    def shape_of(self, tensor: int) -> tuple[int, ...]:
        return self._tensors[tensor].shape

    def dtype_of(self, tensor: int) -> np.dtype:
        return self._tensors[tensor].dtype

    def operator(
        self,
        builtin: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = tflite.BuiltinOptions.NONE,
        options: OptionsWriter | None = None,
    ) -> int:
        """Append an operator (in execution order) and return its index."""
        opcode = self._opcodes.setdefault(builtin, len(self._opcodes))
        self._operators.append(_Operator(opcode, tuple(inputs), tuple(outputs), options_type, options))
        return len(self._operators) - 1

    def replace_options(self, operator: int, options: OptionsWriter) -> None:
        """Rewrite an operator's options, e.g. to fuse a following activation into it."""
        self._operators[operator].options = options

    def last_operator_writes(self, tensor: int) -> int | None:
        """Index of the last operator if it produced `tensor` (a fusion candidate), else None."""
        if self._operators and tensor in self._operators[-1].outputs:
            return len(self._operators) - 1
        return None

    def finish(self, inputs: Sequence[int], outputs: Sequence[int], description: str = "") -> bytes:
        """Serialize the model: one subgraph with the given input and output tensors."""
        payload = sum(len(b) for b in self._buffers)
        builder = flatbuffers.Builder(payload + 64 * 1024)
        # Data first: flatbuffers are written back to front, so the weights end up at the file's end.
        buffer_offsets = [self._write_buffer(builder, data) for data in self._buffers]
        tensor_offsets = [self._write_tensor(builder, t) for t in self._tensors]
        operator_offsets = [self._write_operator(builder, op) for op in self._operators]
        subgraph = self._write_subgraph(builder, tensor_offsets, operator_offsets, inputs, outputs)
        opcode_offsets = [self._write_opcode(builder, code) for code in self._opcodes]
        description_offset = builder.CreateString(description)

        tflite.ModelStartOperatorCodesVector(builder, len(opcode_offsets))
        for off in reversed(opcode_offsets):
            builder.PrependUOffsetTRelative(off)
        opcodes_vector = builder.EndVector()
        tflite.ModelStartSubgraphsVector(builder, 1)
        builder.PrependUOffsetTRelative(subgraph)
        subgraphs_vector = builder.EndVector()
        tflite.ModelStartBuffersVector(builder, len(buffer_offsets))
        for off in reversed(buffer_offsets):
            builder.PrependUOffsetTRelative(off)
        buffers_vector = builder.EndVector()

        tflite.ModelStart(builder)
        tflite.ModelAddVersion(builder, SCHEMA_VERSION)
        tflite.ModelAddOperatorCodes(builder, opcodes_vector)
        tflite.ModelAddSubgraphs(builder, subgraphs_vector)
        tflite.ModelAddDescription(builder, description_offset)
        tflite.ModelAddBuffers(builder, buffers_vector)
        builder.Finish(tflite.ModelEnd(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())

    # -- internals ---------------------------------------------------------------------------------

    def _add(self, tensor: _Tensor) -> int:
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    @staticmethod
    def _check_dtype(name: str, dtype: np.dtype) -> None:
        if dtype not in _TENSOR_TYPES:
            supported = ", ".join(str(d) for d in _TENSOR_TYPES)
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be exported (supported: {supported})")

    @staticmethod
    def _write_buffer(builder: flatbuffers.Builder, data: bytes) -> int:
        data_vector = None
        if data:
            builder.StartVector(1, len(data), BUFFER_ALIGNMENT)
            builder.head -= len(data)
            builder.Bytes[builder.head : builder.head + len(data)] = data
            data_vector = builder.EndVector()
        tflite.BufferStart(builder)
        if data_vector is not None:
            tflite.BufferAddData(builder, data_vector)
        return tflite.BufferEnd(builder)

    @staticmethod
    def _int_vector(builder: flatbuffers.Builder, values: Sequence[int]) -> int:
        builder.StartVector(4, len(values), 4)
        for v in reversed(values):
            builder.PrependInt32(int(v))
        return builder.EndVector()

    def _write_quantization(self, builder: flatbuffers.Builder, q: Quantization) -> int:
        scale = np.asarray(q.scale, dtype=np.float32).reshape(-1)
        zero_point = np.asarray(q.zero_point, dtype=np.int64).reshape(-1)
        builder.StartVector(4, len(scale), 4)
        for v in reversed(scale):
            builder.PrependFloat32(float(v))
        scale_vector = builder.EndVector()
        builder.StartVector(8, len(zero_point), 8)
        for v in reversed(zero_point):
            builder.PrependInt64(int(v))
        zero_point_vector = builder.EndVector()
        tflite.QuantizationParametersStart(builder)
        tflite.QuantizationParametersAddScale(builder, scale_vector)
        tflite.QuantizationParametersAddZeroPoint(builder, zero_point_vector)
        tflite.QuantizationParametersAddQuantizedDimension(builder, q.axis)
        return tflite.QuantizationParametersEnd(builder)

    def _write_tensor(self, builder: flatbuffers.Builder, t: _Tensor) -> int:
        name = builder.CreateString(t.name)
        shape = self._int_vector(builder, t.shape)
        signature = self._int_vector(builder, t.shape_signature) if t.shape_signature else None
        quantization = self._write_quantization(builder, t.quantization) if t.quantization else None
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(builder, signature)
        tflite.TensorAddType(builder, _TENSOR_TYPES[t.dtype])
        tflite.TensorAddBuffer(builder, t.buffer)
        tflite.TensorAddName(builder, name)
        if quantization is not None:
            tflite.TensorAddQuantization(builder, quantization)
        if t.is_variable:
            tflite.TensorAddIsVariable(builder, True)
        return tflite.TensorEnd(builder)

    def _write_operator(self, builder: flatbuffers.Builder, op: _Operator) -> int:
        inputs = self._int_vector(builder, op.inputs)
        outputs = self._int_vector(builder, op.outputs)
        options = op.options(builder) if op.options is not None else None
        tflite.OperatorStart(builder)
        tflite.OperatorAddOpcodeIndex(builder, op.opcode)
        tflite.OperatorAddInputs(builder, inputs)
        tflite.OperatorAddOutputs(builder, outputs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(builder, op.options_type)
            tflite.OperatorAddBuiltinOptions(builder, options)
        return tflite.OperatorEnd(builder)

    def _write_subgraph(
        self,
        builder: flatbuffers.Builder,
        tensor_offsets: list[int],
        operator_offsets: list[int],
        inputs: Sequence[int],
        outputs: Sequence[int],
    ) -> int:
        tflite.SubGraphStartTensorsVector(builder, len(tensor_offsets))
        for off in reversed(tensor_offsets):
            builder.PrependUOffsetTRelative(off)
        tensors_vector = builder.EndVector()
        tflite.SubGraphStartOperatorsVector(builder, len(operator_offsets))
        for off in reversed(operator_offsets):
            builder.PrependUOffsetTRelative(off)
        operators_vector = builder.EndVector()
        inputs_vector = self._int_vector(builder, inputs)
        outputs_vector = self._int_vector(builder, outputs)
        name = builder.CreateString(self.name)
        tflite.SubGraphStart(builder)
        tflite.SubGraphAddTensors(builder, tensors_vector)
        tflite.SubGraphAddInputs(builder, inputs_vector)
        tflite.SubGraphAddOutputs(builder, outputs_vector)
        tflite.SubGraphAddOperators(builder, operators_vector)
        tflite.SubGraphAddName(builder, name)
        return tflite.SubGraphEnd(builder)

    @staticmethod
    def _write_opcode(builder: flatbuffers.Builder, builtin: int) -> int:
        tflite.OperatorCodeStart(builder)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, min(builtin, _PLACEHOLDER_FOR_GREATER_OP_CODES))
        tflite.OperatorCodeAddBuiltinCode(builder, builtin)
        tflite.OperatorCodeAddVersion(builder, 1)
        return tflite.OperatorCodeEnd(builder)
