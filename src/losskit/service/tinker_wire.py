"""The protobuf half of the Tinker SDK's wire protocol: the ``forward_backward`` request, the
``ForwardBackwardOutput`` and ``SampleResponse`` results.

The schema is the SDK's own generated module (``tinker.proto.tinker_public_pb2``); nothing here re-declares it.

**Requests.** ``ForwardBackwardRequest{model_id=1, seq_id=2, data=3, loss_fn=4, loss_fn_config=5 (legacy
map<string,double>), forward_only=6, loss_fn_config_v2=7 (map<string, LossConfigValue{number | text}>)}``. The SDK
writes numbers to both config maps and strings to v2 only, so v2 is read when present. A ``Datum`` is
``model_input`` (text chunks only, concatenated; tokens are little-endian int32) and ``loss_fn_inputs``
(``map<string, Tensor>``); its provenance spans are ignored. A ``Tensor`` is dense little-endian bytes or CSR
(``values``, int64 ``crow_indices`` and ``col_indices``; unlisted entries are 0) with a dtype (FLOAT32 and INT64;
INT32 and BFLOAT16 are widened) and a shape (empty: one dimension). Byte lengths are checked against the shape and
CSR data for monotonicity and bounds, so a malformed tensor is a named 400, never a crash.

**Replies.** One ``ArrayRecord`` whose ``logprobs`` ``BatchedTensor`` holds every datum's float32 values back to
back with N+1 int64 *byte* offsets, plus the metrics map; a ``SampleResponse`` with int32 tokens, float32
sampled-token logprobs (and prompt logprobs, NaN where not computed), top-k matrices with empty slots
``(0, -99999.0)`` and the stop reason (``stop`` or ``length``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.topk_logprobs import MASK_LOGPROB

from losskit.service.errors import ServiceError
from losskit.service.tensors import MAX_DIMS, MAX_ELEMENTS

PROTOBUF = "application/x-protobuf"

#: wire dtype -> (torch dtype the bytes hold, torch dtype handed to the engine)
_DTYPES: dict[int, tuple[torch.dtype, torch.dtype]] = {
    pb.DTYPE_FLOAT32: (torch.float32, torch.float32),
    pb.DTYPE_INT64: (torch.int64, torch.int64),
    pb.DTYPE_INT32: (torch.int32, torch.int64),
    pb.DTYPE_BFLOAT16: (torch.bfloat16, torch.float32),
}


@dataclasses.dataclass(frozen=True)
class WireDatum:
    """One decoded datum: its model input tokens (int64, 1-D) and its ``loss_fn_inputs``.

    ``shapeless`` names the inputs whose wire tensor carried no shape (read as one dimension; a loss that
    declares such an input as a scalar reads its single element as one).
    """

    tokens: torch.Tensor
    inputs: Mapping[str, torch.Tensor]
    shapeless: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class WireForwardBackward:
    """A decoded ``ForwardBackwardRequest``."""

    model_id: str
    seq_id: int
    loss_fn: str
    config: Mapping[str, float | str]
    forward_only: bool
    data: tuple[WireDatum, ...]


def _bad(message: str, argument: str, code: str = "validation_error") -> ServiceError:
    return ServiceError(code, message, detail={"argument": argument})


def _from_bytes(raw: bytes, dtype: torch.dtype, name: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) % itemsize:
        raise _bad(f"{name}: {len(raw)} bytes is not a whole number of {dtype} values ({itemsize} bytes each)", name)
    if not raw:
        return torch.empty(0, dtype=dtype)
    # The wire is little-endian, as is the host byte order of every platform torch supports.
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def decode_tensor(msg: Any, name: str) -> tuple[torch.Tensor, bool]:
    """A wire ``Tensor`` as a torch tensor (int64 or float32) and whether it carried a shape.

    Raises:
        ServiceError: 400 ``validation_error`` naming the tensor: an unknown dtype, a bad shape, a byte length that
            does not match the shape, CSR indices that are not monotonic or out of bounds.
    """
    if msg.dtype not in _DTYPES:
        raise _bad(f"{name}: dtype {msg.dtype} is not one of FLOAT32 (1), INT64 (2), INT32 (3), BFLOAT16 (4)", name)
    wire, engine = _DTYPES[msg.dtype]
    shape = list(msg.shape)
    if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise _bad(f"{name}: shape {shape} must be at most {MAX_DIMS} non-negative sizes", name)
    numel = math.prod(shape) if shape else None
    if numel is not None and numel > MAX_ELEMENTS:
        raise _bad(f"{name}: {numel} elements, above the limit of {MAX_ELEMENTS}", name)
    encoding = msg.WhichOneof("encoding")
    if encoding == "sparse_csr":
        t = _csr(msg.sparse_csr, wire, shape, name)
    else:  # dense (an unset oneof is an empty dense tensor)
        flat = _from_bytes(msg.dense, wire, name)
        if numel is None:
            t = flat
        elif flat.numel() != numel:
            raise _bad(f"{name}: {flat.numel()} values for shape {shape} (expected {numel})", name)
        else:
            t = flat.reshape(shape)
    return t.to(engine), bool(shape)


def _csr(csr: Any, dtype: torch.dtype, shape: list[int], name: str) -> torch.Tensor:
    if len(shape) != 2:
        raise _bad(f"{name}: a sparse CSR tensor needs a 2-D shape, got {shape}", name)
    rows, cols = shape
    values = _from_bytes(csr.values, dtype, f"{name}.values")
    crow = _from_bytes(csr.crow_indices, torch.int64, f"{name}.crow_indices")
    col = _from_bytes(csr.col_indices, torch.int64, f"{name}.col_indices")
    nnz = values.numel()
    if crow.numel() != rows + 1 or col.numel() != nnz:
        raise _bad(f"{name}: CSR with shape {shape} needs {rows + 1} crow_indices and one col index per value; got "
                   f"{crow.numel()} crow_indices, {col.numel()} col_indices, {nnz} values", name)
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise _bad(f"{name}: CSR crow_indices must rise monotonically from 0 to the number of values ({nnz})", name)
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise _bad(f"{name}: CSR col_indices must lie in [0, {cols})", name)
    dense = torch.zeros(rows, cols, dtype=dtype)
    row_of = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    dense[row_of, col] = values
    return dense


def _tokens(datum: Any, where: str) -> torch.Tensor:
    parts = []
    for j, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            what = "an empty chunk" if kind is None else f"a {kind} chunk"
            raise ServiceError("unsupported_feature", f"{where}.model_input[{j}] is {what}; only encoded_text chunks "
                               "are supported", detail={"argument": f"{where}.model_input"})
        parts.append(_from_bytes(chunk.encoded_text.tokens, torch.int32, f"{where}.model_input[{j}].tokens"))
    tokens = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
    if not tokens.numel():
        raise _bad(f"{where}.model_input has no tokens", "data")
    return tokens


def _config(msg: Any) -> dict[str, float | str]:
    if msg.loss_fn_config_v2:
        out: dict[str, float | str] = {}
        for key, value in msg.loss_fn_config_v2.items():
            kind = value.WhichOneof("value")
            if kind is None:
                raise _bad(f"loss_fn_config[{key!r}] has neither a number nor a text value", key)
            out[key] = value.number if kind == "number" else value.text
        return out
    return dict(msg.loss_fn_config.items())


def decode_forward_backward(body: bytes) -> WireForwardBackward:
    """Decode a protobuf ``ForwardBackwardRequest``.

    Raises:
        ServiceError: 400 ``invalid_protobuf`` when the bytes are not the message, else 400s naming the field.
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ServiceError("invalid_protobuf", f"the request body is not a protobuf ForwardBackwardRequest ({exc})") \
            from None
    if not msg.model_id:
        raise _bad("model_id is missing", "model_id")
    if not msg.data:
        raise _bad("data must hold at least one datum", "data")
    data = []
    for i, datum in enumerate(msg.data):
        where = f"data[{i}]"
        inputs, shapeless = {}, set()
        for key, tensor in datum.loss_fn_inputs.items():
            inputs[key], has_shape = decode_tensor(tensor, f"{where}.loss_fn_inputs[{key!r}]")
            if not has_shape:
                shapeless.add(key)
        data.append(WireDatum(_tokens(datum, where), inputs, frozenset(shapeless)))
    return WireForwardBackward(msg.model_id, msg.seq_id, msg.loss_fn, _config(msg), msg.forward_only, tuple(data))


def canonical_bytes(body: bytes) -> bytes:
    """The deterministic serialisation of a (valid) ``ForwardBackwardRequest``: what its de-duplication hash is
    taken of, so that a resend with map entries in another order is still the same request."""
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(body)
    return msg.SerializeToString(deterministic=True)


# ---- replies ----------------------------------------------------------------------------------------------------
def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def encode_forward_backward_output(result: Mapping[str, Any]) -> bytes:
    """``ForwardBackwardOutput`` bytes of a forward_backward result (``loss_fn_outputs[i]["logprobs"]`` tensors,
    all with the same trailing shape, and ``metrics``; a non-finite metric, sent as None by the engine, is NaN)."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result["metrics"].items():
        out.metrics[key] = _float(value)
    rows = [o["logprobs"].detach().to("cpu", torch.float32).contiguous() for o in result["loss_fn_outputs"]]
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(rows))
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    trailing = {tuple(r.shape[1:]) for r in rows}
    if len(trailing) > 1:
        raise ValueError(f"logprobs of one request differ in trailing shape: {sorted(trailing)}")
    field.trailing_shape.extend(trailing.pop() if trailing else ())
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + 4 * r.numel())
    field.data = b"".join(r.numpy().tobytes() for r in rows)
    field.offsets = torch.tensor(offsets, dtype=torch.int64).numpy().tobytes()
    return out.SerializeToString()


def _topk(msg: Any, rows: Sequence[Sequence[Sequence[float]] | None], k: int) -> None:
    """Fill a ``TopkLogprobs``: ``rows[i]`` is a list of ``[token_id, logprob]`` (or None: nothing computed)."""
    ids, lps = [], []
    for row in rows:
        row = list(row or [])[:k]
        row += [[0, MASK_LOGPROB]] * (k - len(row))
        ids += [int(t) for t, _ in row]
        lps += [float(v) for _, v in row]
    msg.k = k
    msg.length = len(rows)
    msg.token_ids = torch.tensor(ids, dtype=torch.int32).numpy().tobytes()
    msg.logprobs = torch.tensor(lps, dtype=torch.float32).numpy().tobytes()


def encode_sample_response(result: Mapping[str, Any], *, topk_prompt: int = 0, topk_sample: int = 0) -> bytes:
    """``SampleResponse`` bytes of a sampling result (``sequences`` of tokens, logprobs, stop_reason and, when
    asked, ``topk_logprobs``; ``prompt_logprobs`` with NaN at unscored positions; ``topk_prompt_logprobs``)."""
    out = pb.SampleResponse(prompt_cache_hit_tokens=0)
    for seq in result["sequences"]:
        s = out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH,
            tokens=torch.tensor(seq["tokens"], dtype=torch.int32).numpy().tobytes(),
            logprobs=torch.tensor(seq["logprobs"], dtype=torch.float32).numpy().tobytes(),
        )
        if topk_sample:
            _topk(s.topk_sampled_logprobs, seq.get("topk_logprobs", []), topk_sample)
    if "prompt_logprobs" in result:
        out.prompt_logprobs = torch.tensor([_float(v) for v in result["prompt_logprobs"]],
                                           dtype=torch.float32).numpy().tobytes()
    if topk_prompt:
        _topk(out.topk_prompt_logprobs, result.get("topk_prompt_logprobs", []), topk_prompt)
    return out.SerializeToString()
