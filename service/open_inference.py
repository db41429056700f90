"""The Open Inference Protocol v2 (KServe, Triton) REST codec: infer requests in, infer
responses out, with JSON tensors and the binary tensor data extension. No HTTP here.

The model has one input and three outputs:

    image            BYTES [N]            encoded JPEG / PNG / DICOM files
    probabilities    FP32  [N, n_labels]  in the bundle's label order
    label            BYTES [N]            the screening label
    screen_positive  BOOL  [N]            positive probability >= threshold

A BYTES element in a JSON tensor is a string, and a file is not text: in JSON tensors
each `image` element is the file in base64 (RFC 4648, standard alphabet). With the binary
extension the elements are raw bytes, each prefixed by its length (uint32, little-endian),
as Triton's clients send them.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT = "image"
PROBABILITIES = "probabilities"
LABEL = "label"
SCREEN_POSITIVE = "screen_positive"
OUTPUTS = (PROBABILITIES, LABEL, SCREEN_POSITIVE)
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)

_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request the protocol (or a limit) does not allow; answered {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray  # float32, bool or object (str) array of `shape`


def _json_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
        head, binary = body[:length], body[length:]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(
            "the inference request is not valid JSON (binary tensors need the "
            f"{HEADER_LENGTH} header)"
        ) from None
    if not isinstance(request, dict):
        raise ProtocolError("the inference request must be a JSON object")
    return request, binary


def _element_count(shape: Any) -> int:
    if (
        not isinstance(shape, list)
        or not shape
        or len(shape) > 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"input '{INPUT}' must have shape [N] (or [N, 1]); got {shape}")
    if len(shape) == 2 and shape[1] != 1:
        raise ProtocolError(f"input '{INPUT}' must have shape [N] (or [N, 1]); got {shape}")
    return int(shape[0])


def _binary_elements(raw: bytes, count: int) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise ProtocolError(f"input '{INPUT}': truncated BYTES element length")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise ProtocolError(f"input '{INPUT}': BYTES element {len(elements)} is truncated")
        elements.append(raw[offset : offset + size])
        offset += size
    if len(elements) != count:
        raise ProtocolError(
            f"input '{INPUT}' has shape [{count}] but its binary data holds "
            f"{len(elements)} elements"
        )
    return elements


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [value for item in data for value in _flatten(item)]
    return [data]


def _json_elements(data: Any, count: int) -> list[bytes]:
    values = _flatten(data)
    if len(values) != count:
        raise ProtocolError(f"input '{INPUT}' has shape [{count}] but {len(values)} data elements")
    elements = []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ProtocolError(f"input '{INPUT}' element {index} must be a base64 string")
        try:
            elements.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(
                f"input '{INPUT}' element {index} is not base64: in JSON tensors each "
                "image is the file in base64 (or send binary tensor data)"
            ) from None
    return elements


def _parameters(node: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = node.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where} parameters must be an object")
    return parameters


def _outputs(request: dict[str, Any]) -> list[RequestedOutput]:
    default_binary = _parameters(request, "request").get("binary_data_output", False) is True
    wanted = request.get("outputs")
    if wanted is None:
        return [RequestedOutput(name, default_binary) for name in OUTPUTS]
    if not isinstance(wanted, list) or not wanted:
        raise ProtocolError("'outputs' must be a non-empty list")
    outputs: list[RequestedOutput] = []
    for item in wanted:
        if not isinstance(item, dict) or item.get("name") not in OUTPUTS:
            name = item.get("name") if isinstance(item, dict) else item
            raise ProtocolError(
                f"unknown output {name!r}; this model has outputs {', '.join(OUTPUTS)}"
            )
        parameters = _parameters(item, f"output '{item['name']}'")
        if "classification" in parameters:
            raise ProtocolError("the classification extension is not supported")
        binary = parameters.get("binary_data", default_binary) is True
        outputs.append(RequestedOutput(item["name"], binary))
    return outputs


def parse_infer_request(
    body: bytes, header_length: str | None, max_items: int, max_item_bytes: int
) -> InferRequest:
    """Validate an infer request and take its images out (none decoded yet)."""
    request, binary = _json_header(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"the request must have exactly one input, '{INPUT}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise ProtocolError(
            f"unknown input {tensor.get('name')!r}; this model's input is '{INPUT}'"
        )
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(
            f"input '{INPUT}' must be BYTES (encoded image files); got {tensor.get('datatype')!r}"
        )
    count = _element_count(tensor.get("shape"))
    if count == 0:
        raise ProtocolError(f"input '{INPUT}' holds no image")
    if count > max_items:
        raise ProtocolError(f"at most {max_items} images per request; got {count}", 413)
    binary_size = _parameters(tensor, f"input '{INPUT}'").get("binary_data_size")
    if binary_size is not None:
        if (
            not isinstance(binary_size, int)
            or isinstance(binary_size, bool)
            or binary_size != len(binary)
        ):
            raise ProtocolError(
                f"input '{INPUT}' declares binary_data_size {binary_size!r} but "
                f"{len(binary)} bytes follow the JSON header"
            )
        if "data" in tensor:
            raise ProtocolError(f"input '{INPUT}' has both binary data and 'data'")
        images = _binary_elements(binary, count)
    else:
        if binary:
            raise ProtocolError(
                f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size"
            )
        if "data" not in tensor:
            raise ProtocolError(f"input '{INPUT}' has no data")
        images = _json_elements(tensor["data"], count)
    for index, image in enumerate(images):
        if len(image) > max_item_bytes:
            raise ProtocolError(
                f"input '{INPUT}' element {index} is larger than the limit of "
                f"{max_item_bytes:,} bytes",
                413,
            )
    return InferRequest(request_id, images, _outputs(request))


def _binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(
            _LENGTH.pack(len(encoded)) + encoded
            for encoded in (str(value).encode() for value in tensor.values.reshape(-1))
        )
    if tensor.datatype == "BOOL":
        return tensor.values.astype(np.uint8).tobytes()
    return tensor.values.astype("<f4").tobytes()


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.values.reshape(-1)
    if tensor.datatype == "BYTES":
        return [str(value) for value in flat]
    if tensor.datatype == "BOOL":
        return [bool(value) for value in flat]
    return [float(value) for value in flat.astype(np.float32)]


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    tensors: dict[str, Tensor],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for wanted in request.outputs:
        tensor = tensors[wanted.name]
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if wanted.binary:
            blob = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = outputs
    head = json.dumps(response).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def output_tensors(
    labels: Sequence[str],
    probabilities: Sequence[dict[str, float]],
    label_values: Sequence[str],
    screen_positive: Sequence[bool],
) -> dict[str, Tensor]:
    count = len(label_values)
    matrix = np.array(
        [[row[name] for name in labels] for row in probabilities], dtype=np.float32
    ).reshape(count, len(labels))
    return {
        PROBABILITIES: Tensor(PROBABILITIES, "FP32", [count, len(labels)], matrix),
        LABEL: Tensor(LABEL, "BYTES", [count], np.array(label_values, dtype=object)),
        SCREEN_POSITIVE: Tensor(
            SCREEN_POSITIVE, "BOOL", [count], np.array(screen_positive, dtype=bool)
        ),
    }


def model_metadata(name: str, version: str, n_labels: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, n_labels]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
            {"name": SCREEN_POSITIVE, "datatype": "BOOL", "shape": [-1]},
        ],
    }
