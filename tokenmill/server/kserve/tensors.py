"""Tensors of the open inference protocol (KServe v2, as Triton speaks it): JSON tensors, Triton's
binary tensor extension, and the raw contents of gRPC messages, to and from numpy.

Binary layout (the extension `tritonclient.http` uses by default): the request body is the JSON
header, whose length is given in the `Inference-Header-Content-Length` HTTP header, followed by
each binary input's bytes in the order the inputs are listed, each input saying its size in
`parameters.binary_data_size`. Fixed-size types are little-endian and row-major; a BYTES element
is a 4-byte little-endian length followed by that many bytes.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Optional

import numpy as np

DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_NAMES = {np.dtype(v): k for k, v in DATATYPES.items() if k != "BYTES"}


class TensorError(ValueError):
    """A tensor that does not say what it holds (an HTTP 400, a gRPC INVALID_ARGUMENT)."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    return _NAMES[array.dtype]


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TensorError(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _check_datatype(name: str, datatype: Any) -> Any:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise TensorError(f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(DATATYPES)})")
    return DATATYPES[datatype]


def from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """A tensor from its raw little-endian bytes (binary extension, gRPC raw contents)."""
    dtype = _check_datatype(name, datatype)
    count = int(np.prod(shape)) if shape else 1
    if datatype != "BYTES":
        expected = count * np.dtype(dtype).itemsize
        if len(raw) != expected:
            raise TensorError(f"input {name!r}: {len(raw)} bytes of data for shape {list(shape)} of {datatype} "
                              f"(expected {expected})")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"input {name!r}: a BYTES element's length prefix is cut off")
        (n,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + n > len(raw):
            raise TensorError(f"input {name!r}: a BYTES element says {n} bytes but fewer follow")
        items.append(raw[offset + 4:offset + 4 + n])
        offset += 4 + n
    if len(items) != count:
        raise TensorError(f"input {name!r}: {len(items)} BYTES elements for shape {list(shape)} ({count} expected)")
    return np.array(items, dtype=np.object_).reshape(shape)


def to_bytes(array: np.ndarray) -> bytes:
    if datatype_of(array) != "BYTES":
        return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    out = bytearray()
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dtype = _check_datatype(name, datatype)
    flat = np.array(data, dtype=object).reshape(-1) if data is not None else np.array([], dtype=object)
    count = int(np.prod(shape)) if shape else 1
    if flat.size != count:
        raise TensorError(f"input {name!r}: {flat.size} values for shape {list(shape)} ({count} expected)")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise TensorError(f"input {name!r}: BYTES data must be strings in JSON")
        return np.array([x.encode("utf-8") for x in flat], dtype=np.object_).reshape(shape)
    kind = np.dtype(dtype).kind
    ok = (lambda x: isinstance(x, bool)) if kind == "b" else (
        (lambda x: isinstance(x, int) and not isinstance(x, bool)) if kind in "iu"
        else (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)))
    if not all(ok(x) for x in flat):
        raise TensorError(f"input {name!r}: data does not match datatype {datatype}")
    try:
        values = np.array(flat.tolist(), dtype=dtype)
    except OverflowError:
        raise TensorError(f"input {name!r}: a value is out of range for {datatype}") from None
    if kind == "f" and not np.isfinite(values).all():
        raise TensorError(f"input {name!r}: a value is not finite in {datatype}")
    if kind in "iu" and not np.array_equal(values.astype(object), flat):
        raise TensorError(f"input {name!r}: a value is out of range for {datatype}")
    return values.reshape(shape)


def to_json(array: np.ndarray) -> list[Any]:
    if datatype_of(array) == "BYTES":
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _no_constant(name: str) -> Any:
    raise TensorError(f"{name} is not a number JSON allows")


def loads(data: bytes) -> Any:
    """JSON without NaN / Infinity literals (a NaN temperature would sample garbage)."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorError(f"the request is not valid JSON: {e}") from None


def parse_http_request(body: bytes, header_length: Optional[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the JSON request, its inputs as arrays) from an HTTP infer request body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise TensorError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise TensorError(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    request = loads(head)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise TensorError("the request must be a JSON object with an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in request["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TensorError("each input must be an object with a 'name'")
        name = spec["name"]
        if name in inputs:
            raise TensorError(f"input {name!r} is given twice")
        shape = _check_shape(name, spec.get("shape"))
        datatype = spec.get("datatype")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise TensorError(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise TensorError(f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes "
                                  "of binary data")
            inputs[name] = from_bytes(name, datatype, shape, binary[offset:offset + size])
            offset += size
        else:
            if "data" not in spec:
                raise TensorError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            inputs[name] = from_json(name, datatype, shape, spec["data"])
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return request, inputs


def http_response(model: str, version: str, request_id: Optional[str], outputs: dict[str, np.ndarray],
                  binary: set[str]) -> tuple[bytes, Optional[int]]:
    """The body of an infer response, and the JSON header's length when some outputs are binary."""
    specs, blobs = [], []
    for name, array in outputs.items():
        spec: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if name in binary:
            raw = to_bytes(array)
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            spec["data"] = to_json(array)
        specs.append(spec)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": specs}
    if request_id:
        head["id"] = request_id
    header = json.dumps(head).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
