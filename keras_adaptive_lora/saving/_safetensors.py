"""The safetensors file format, read and written with numpy alone.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` and an optional
`"__metadata__"` of strings) and the tensors' little-endian bytes, one after
the other. PEFT adapters (`adapter_model.safetensors`) use it. Reading here
needs no `safetensors` package and also reads `BF16` tensors (as float32),
which numpy has no dtype for. Only floating-point tensors are read.
"""

import json
import struct

import numpy as np

#: safetensors dtype -> numpy dtype (BF16 is widened to float32 on reading).
_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
#: A larger header is not a safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


def write_safetensors(path, tensors, metadata=None):
    """Write `{name: float array}` as float32 tensors, names sorted.

    Args:
        path: the file to write (the caller makes it atomic).
        tensors: `{name: array-like}`.
        metadata: optional `{str: str}` stored as `"__metadata__"`.
    """
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        shape = [int(d) for d in np.shape(tensors[name])]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def read_safetensors(path):
    """`({name: float32 array}, metadata)` of a safetensors file.

    Raises a `ValueError` naming the file for anything that is not a
    well-formed safetensors file of floating-point tensors.
    """

    def bad(what):
        return ValueError(f"{str(path)!r} is not a valid safetensors file: {what}.")

    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise bad("it is shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise bad(f"its header length {size} does not fit the file")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + size :]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if dtype not in _FLOATS:
            raise bad(f"tensor {name!r} has dtype {dtype}; adapter factors are F32, F16, BF16 or F64")
        width = np.dtype(_FLOATS[dtype]).itemsize
        if not (0 <= begin <= end <= len(data)) or end - begin != width * int(np.prod(shape)):
            raise bad(f"tensor {name!r} has data_offsets {[begin, end]} that do not match its shape {shape}")
        array = np.frombuffer(data[begin:end], dtype=_FLOATS[dtype]).reshape(shape)
        if dtype == "BF16":  # the high half of a float32
            array = (array.astype("<u4") << 16).view("<f4")
        tensors[name] = array.astype("float32")
    return tensors, metadata
