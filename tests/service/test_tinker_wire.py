"""The Tinker wire codecs against the SDK's own codecs (the oracles), the lenient JSON parsing of the SDK's request
models, and the startup schema check."""

import logging
import math

import numpy as np
import pytest
import torch
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from losskit.service import tinker_json
from losskit.service.errors import ServiceError
from losskit.service.sdk_check import check_sdk
from losskit.service.tinker_wire import (
    canonical_bytes,
    decode_forward_backward,
    decode_tensor,
    encode_forward_backward_output,
    encode_sample_response,
)
from tests.service.tinker_sdk import types


def _request(data, loss_fn="cross_entropy", config=None, seq_id=3):
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="sess_x:train:0", seq_id=seq_id)
    return forward_backward_request_to_proto(req)


def test_forward_backward_request_round_trips_through_the_sdk_encoder():
    targets = torch.zeros(6, 4, dtype=torch.long)  # mostly zero and 2-D: the SDK sends it as sparse CSR
    targets[0, 1], targets[2, 0], targets[5, 3] = 5, 6, 7
    weights = torch.zeros(6, 4)
    weights[1, 2], weights[4, 0] = -2.0, 0.5
    data = [
        types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]),
                                                         types.EncodedTextChunk(tokens=[3])]),
                    loss_fn_inputs={"target_tokens": targets, "weights": weights}),
        types.Datum(model_input=types.ModelInput.from_ints([9, 8, 7, 6]),
                    loss_fn_inputs={"target_tokens": [8, 7, 6, 5], "advantages": [0.25, -1.0, 0.0, 3.5]}),
    ]
    msg = _request(data, "ppo", {"clip_low_threshold": 0.5, "note": "text"})
    assert msg.data[0].loss_fn_inputs["target_tokens"].HasField("sparse_csr")
    wire = decode_forward_backward(msg.SerializeToString())
    assert (wire.model_id, wire.seq_id, wire.loss_fn, wire.forward_only) == ("sess_x:train:0", 3, "ppo", False)
    assert wire.config == {"clip_low_threshold": 0.5, "note": "text"}  # v2 (strings live only there)
    assert wire.data[0].tokens.tolist() == [1, 2, 3] and wire.data[1].tokens.dtype == torch.int64
    assert torch.equal(wire.data[0].inputs["target_tokens"], targets)
    assert msg.data[0].loss_fn_inputs["weights"].HasField("sparse_csr")
    assert torch.equal(wire.data[0].inputs["weights"], weights)
    assert wire.data[1].inputs["advantages"].dtype == torch.float32
    assert wire.data[1].inputs["advantages"].tolist() == [0.25, -1.0, 0.0, 3.5]
    forward = _request(data[1:])
    forward.forward_only = True
    assert decode_forward_backward(forward.SerializeToString()).forward_only


def test_legacy_config_map_is_read_when_v2_is_absent():
    msg = _request([types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})])
    msg.loss_fn_config["beta"] = 0.25
    assert decode_forward_backward(msg.SerializeToString()).config == {"beta": 0.25}


def test_canonical_bytes_ignore_map_order():
    a, b = pb.ForwardBackwardRequest(model_id="m", seq_id=1), pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    for key in "xyz":
        a.loss_fn_config[key] = 1.0
    for key in "zyx":
        b.loss_fn_config[key] = 1.0
    assert canonical_bytes(a.SerializeToString()) == canonical_bytes(b.SerializeToString())


def _tensor(dtype, shape, dense=b"", **csr):
    msg = pb.Tensor(dtype=dtype, shape=shape)
    if csr:
        msg.sparse_csr.CopyFrom(pb.SparseCsr(**csr))
    else:
        msg.dense = dense
    return msg


def test_tensor_dtypes_are_widened():
    t, has_shape = decode_tensor(_tensor(pb.DTYPE_INT32, [3], np.array([1, -2, 3], np.int32).tobytes()), "x")
    assert t.dtype == torch.int64 and t.tolist() == [1, -2, 3] and has_shape
    raw = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    t, _ = decode_tensor(_tensor(pb.DTYPE_BFLOAT16, [2], raw), "x")
    assert t.dtype == torch.float32 and t.tolist() == [1.5, -2.0]
    t, has_shape = decode_tensor(_tensor(pb.DTYPE_FLOAT32, [], np.array([4.0], np.float32).tobytes()), "x")
    assert t.shape == (1,) and not has_shape  # no shape: one dimension


@pytest.mark.parametrize("msg, words", [
    (_tensor(0, [1], b"\0" * 4), "dtype 0"),
    (_tensor(pb.DTYPE_FLOAT32, [3], b"\0" * 8), "2 values for shape [3]"),
    (_tensor(pb.DTYPE_FLOAT32, [2], b"\0" * 7), "whole number"),
    (_tensor(pb.DTYPE_FLOAT32, [1] * 9, b"\0" * 4), "at most 8"),
    (_tensor(pb.DTYPE_INT64, [2], values=np.array([1], np.int64).tobytes(),
             crow_indices=np.array([0, 1], np.int64).tobytes(), col_indices=np.array([0], np.int64).tobytes()),
     "2-D shape"),
    (_tensor(pb.DTYPE_INT64, [2, 2], values=np.array([1, 2], np.int64).tobytes(),
             crow_indices=np.array([0, 2, 1], np.int64).tobytes(), col_indices=np.array([0, 1], np.int64).tobytes()),
     "monotonically"),
    (_tensor(pb.DTYPE_INT64, [2, 2], values=np.array([1], np.int64).tobytes(),
             crow_indices=np.array([0, 1, 1], np.int64).tobytes(), col_indices=np.array([2], np.int64).tobytes()),
     "[0, 2)"),
])
def test_malformed_tensors_are_named_400s(msg, words):
    with pytest.raises(ServiceError) as info:
        decode_tensor(msg, "data[0].loss_fn_inputs['w']")
    assert info.value.status == 400 and words in info.value.message and "loss_fn_inputs['w']" in info.value.message


def test_bad_requests_are_named():
    with pytest.raises(ServiceError) as info:
        decode_forward_backward(b"\xff\xfe garbage")
    assert info.value.code == "invalid_protobuf"
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    msg.data.add().model_input.add().image.data = b"png"
    with pytest.raises(ServiceError) as info:
        decode_forward_backward(msg.SerializeToString())
    assert info.value.code == "unsupported_feature" and "image" in info.value.message
    with pytest.raises(ServiceError) as info:
        decode_forward_backward(pb.ForwardBackwardRequest(model_id="m", seq_id=1).SerializeToString())
    assert "at least one datum" in info.value.message


def test_forward_backward_output_decodes_with_the_sdk():
    rows = [torch.tensor([-1.5, -0.25, -3.0]), torch.tensor([-2.0])]
    body = encode_forward_backward_output({"metrics": {"loss:sum": 6.75, "ratio:mean": None},
                                           "loss_fn_outputs": [{"logprobs": r} for r in rows]})
    out = deserialize_forward_backward_output(body)
    assert out.loss_fn_output_type == "ArrayRecord"
    assert out.metrics["loss:sum"] == 6.75 and math.isnan(out.metrics["ratio:mean"])
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [r.tolist() for r in rows]
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[3], [1]]
    ranked = encode_forward_backward_output({"metrics": {}, "loss_fn_outputs": [{"logprobs": torch.ones(2, 3)}]})
    assert deserialize_forward_backward_output(ranked).loss_fn_outputs[0]["logprobs"].shape == [2, 3]


def test_sample_response_decodes_with_the_sdk():
    result = {
        "sequences": [
            {"tokens": [5, 258], "logprobs": [-0.5, -1.25], "stop_reason": "stop",
             "topk_logprobs": [[[5, -0.5], [6, -2.0]], [[258, -1.25], [1, -3.0]]]},
            {"tokens": [7], "logprobs": [-4.0], "stop_reason": "length", "topk_logprobs": [[[7, -4.0], [2, -4.5]]]},
        ],
        "prompt_logprobs": [math.nan, -2.5, -0.75],
        "topk_prompt_logprobs": [None, [[1, -0.1], [2, -0.2]], [[3, -0.3], [4, -0.4]]],
    }
    out = deserialize_sample_response(encode_sample_response(result, topk_prompt=2, topk_sample=2))
    assert [s.tokens for s in out.sequences] == [[5, 258], [7]]
    assert [s.logprobs for s in out.sequences] == [[-0.5, -1.25], [-4.0]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.prompt_logprobs == [None, -2.5, -0.75]
    assert out.topk_prompt_logprobs[0] is None
    assert [list(map(tuple, r)) for r in out.topk_prompt_logprobs[1:]] == \
        [[(1, pytest.approx(-0.1)), (2, pytest.approx(-0.2))], [(3, pytest.approx(-0.3)), (4, pytest.approx(-0.4))]]
    assert out.sequences[0].topk_logprobs[1] == [(258, -1.25), (1, -3.0)]
    plain = deserialize_sample_response(encode_sample_response({"sequences": result["sequences"][:1]}))
    assert plain.prompt_logprobs is None and plain.sequences[0].topk_logprobs is None


def test_unknown_fields_are_dropped_with_one_warning(caplog):
    body = b'{"session_id": "s", "model_seq_id": 0, "base_model": "m", "new_field": 1, ' \
           b'"lora_config": {"rank": 4, "future_knob": true}}'
    with caplog.at_level(logging.WARNING, logger="losskit.serve"):
        first = tinker_json.parse(types.CreateModelRequest, body)
        tinker_json.parse(types.CreateModelRequest, body)
    assert first.lora_config.rank == 4 and first.base_model == "m"
    warned = [r.getMessage() for r in caplog.records if "ignoring unknown field" in r.getMessage()]
    assert len(warned) == 2 and any("lora_config.future_knob" in w for w in warned)


def test_json_errors_name_the_field():
    with pytest.raises(ServiceError) as info:
        tinker_json.parse(types.CreateModelRequest, b"{not json")
    assert info.value.code == "invalid_json"
    with pytest.raises(ServiceError) as info:
        tinker_json.parse(types.CreateModelRequest, b'{"session_id": "s", "model_seq_id": 0}')
    assert info.value.code == "validation_error" and "'base_model'" in info.value.message
    with pytest.raises(ServiceError) as info:
        tinker_json.parse(types.CreateModelRequest, b'{"session_id": "s", "model_seq_id": "x", "base_model": "m"}')
    assert "'model_seq_id'" in info.value.message
    with pytest.raises(ServiceError) as info:
        tinker_json.parse(types.CreateModelRequest, b"[1, 2]")
    assert "JSON object" in info.value.message


def test_the_installed_sdk_matches_the_stored_fingerprint():
    result = check_sdk()
    assert result.ok, result.problem


def test_a_changed_schema_fails_the_check_naming_the_field(monkeypatch):
    from losskit.service import sdk_check

    fingerprint = list(sdk_check.WIRE_FINGERPRINT)
    i = next(i for i, f in enumerate(fingerprint) if f[:2] == ("Tensor", "dtype"))
    fingerprint[i] = ("Tensor", "dtype", 7, 14, "optional", "")  # as if the SDK had renumbered the field
    try:
        monkeypatch.setattr(sdk_check, "WIRE_FINGERPRINT", tuple(fingerprint))
        check_sdk.cache_clear()
        result = check_sdk()
        assert not result.ok and result.version == "0.38.0"
        assert "Tensor.dtype" in result.problem and "tinker>=0.38,<0.39" in result.problem
        monkeypatch.undo()
        monkeypatch.setitem(sdk_check.MODEL_FIELDS, "UntypedAPIFuture",
                            (*sdk_check.MODEL_FIELDS["UntypedAPIFuture"], "new_field"))
        check_sdk.cache_clear()
        result = check_sdk()
        assert not result.ok and "UntypedAPIFuture" in result.problem and "new_field" in result.problem
    finally:
        monkeypatch.undo()
        check_sdk.cache_clear()
    assert check_sdk().ok



def test_models_the_sdk_does_not_re_export_are_checked_in_their_own_module(monkeypatch):
    from losskit.service import sdk_check

    assert "TryAgainResponse" in sdk_check.MODEL_FIELDS  # tinker.types lacks it; tinker.types.try_again_response has it
    try:
        monkeypatch.setitem(sdk_check.MODEL_FIELDS, "TryAgainResponse",
                            (*sdk_check.MODEL_FIELDS["TryAgainResponse"], "retry_after"))
        check_sdk.cache_clear()
        result = check_sdk()
        assert not result.ok and "TryAgainResponse lacks field retry_after" in result.problem
        monkeypatch.setitem(sdk_check.MODEL_FIELDS, "NoSuchResponse", ("x",))
        monkeypatch.delitem(sdk_check.MODEL_FIELDS, "TryAgainResponse")
        check_sdk.cache_clear()
        assert "NoSuchResponse lacks field x" in check_sdk().problem  # an absent model fails, never crashes
    finally:
        monkeypatch.undo()
        check_sdk.cache_clear()
    assert check_sdk().ok
