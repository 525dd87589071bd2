"""The startup check of the ``tinker`` SDK, the schema source of the Tinker wire surface.

``check_sdk()`` runs before the port opens (unless ``--no-tinker-surface``):

1. ``importlib.metadata.version("tinker")`` must satisfy ``SUPPORTED`` (``>=0.38,<0.39``);
2. the wire fingerprint must match: one ``(message, field, number, type, label, oneof)`` tuple per protobuf field
   the wire surface touches, compared with ``tinker.proto.tinker_public_pb2.DESCRIPTOR``, plus the field names of
   the SDK's pydantic request and reply models.

On a mismatch ``strict`` (the default) exits with code 2 naming the installed version, the supported range and the
first differing field; ``warn`` logs and continues. Importing the SDK's protobuf module takes a few seconds, so the
check runs once per process. Raising the pin means regenerating ``WIRE_FINGERPRINT`` and ``MODEL_FIELDS`` from
the new SDK and re-running the wire-surface tests.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import re
from typing import Any

SUPPORTED = ">=0.38,<0.39"

#: (message, field, number, protobuf type, label, containing oneof) of every field the wire surface reads or writes.
WIRE_FINGERPRINT: tuple[tuple[str, str, int, int, str, str], ...] = (
    ('ForwardBackwardRequest', 'model_id', 1, 9, 'optional', ''),
    ('ForwardBackwardRequest', 'seq_id', 2, 5, 'optional', ''),
    ('ForwardBackwardRequest', 'data', 3, 11, 'repeated', ''),
    ('ForwardBackwardRequest', 'loss_fn', 4, 9, 'optional', ''),
    ('ForwardBackwardRequest', 'loss_fn_config', 5, 11, 'repeated', ''),
    ('ForwardBackwardRequest', 'forward_only', 6, 8, 'optional', ''),
    ('ForwardBackwardRequest', 'loss_fn_config_v2', 7, 11, 'repeated', ''),
    ('ForwardBackwardRequest.LossFnConfigEntry', 'key', 1, 9, 'optional', ''),
    ('ForwardBackwardRequest.LossFnConfigEntry', 'value', 2, 1, 'optional', ''),
    ('ForwardBackwardRequest.LossFnConfigV2Entry', 'key', 1, 9, 'optional', ''),
    ('ForwardBackwardRequest.LossFnConfigV2Entry', 'value', 2, 11, 'optional', ''),
    ('Datum', 'model_input', 1, 11, 'repeated', ''),
    ('Datum', 'loss_fn_inputs', 2, 11, 'repeated', ''),
    ('Datum', 'model_input_spans', 3, 11, 'repeated', ''),
    ('Datum', 'loss_fn_input_spans', 4, 11, 'repeated', ''),
    ('Datum.LossFnInputsEntry', 'key', 1, 9, 'optional', ''),
    ('Datum.LossFnInputsEntry', 'value', 2, 11, 'optional', ''),
    ('Chunk', 'encoded_text', 1, 11, 'optional', 'chunk'),
    ('Chunk', 'image', 2, 11, 'optional', 'chunk'),
    ('Chunk', 'dmel', 3, 11, 'optional', 'chunk'),
    ('EncodedTextChunk', 'tokens', 1, 12, 'optional', ''),
    ('LossConfigValue', 'number', 1, 1, 'optional', 'value'),
    ('LossConfigValue', 'text', 2, 9, 'optional', 'value'),
    ('Tensor', 'dense', 1, 12, 'optional', 'encoding'),
    ('Tensor', 'sparse_csr', 2, 11, 'optional', 'encoding'),
    ('Tensor', 'dtype', 3, 14, 'optional', ''),
    ('Tensor', 'shape', 4, 3, 'repeated', ''),
    ('SparseCsr', 'values', 1, 12, 'optional', ''),
    ('SparseCsr', 'crow_indices', 2, 12, 'optional', ''),
    ('SparseCsr', 'col_indices', 3, 12, 'optional', ''),
    ('ForwardBackwardOutput', 'loss_fn_output_type', 1, 9, 'optional', ''),
    ('ForwardBackwardOutput', 'loss_fn_outputs', 2, 11, 'repeated', ''),
    ('ForwardBackwardOutput', 'metrics', 3, 11, 'repeated', ''),
    ('ForwardBackwardOutput.MetricsEntry', 'key', 1, 9, 'optional', ''),
    ('ForwardBackwardOutput.MetricsEntry', 'value', 2, 1, 'optional', ''),
    ('ArrayRecord', 'type_tag', 1, 9, 'optional', ''),
    ('ArrayRecord', 'fields', 2, 11, 'repeated', ''),
    ('ArrayRecord', 'num_datums', 3, 3, 'optional', ''),
    ('ArrayRecord.FieldsEntry', 'key', 1, 9, 'optional', ''),
    ('ArrayRecord.FieldsEntry', 'value', 2, 11, 'optional', ''),
    ('BatchedTensor', 'data', 1, 12, 'optional', ''),
    ('BatchedTensor', 'offsets', 2, 12, 'optional', ''),
    ('BatchedTensor', 'dtype', 3, 14, 'optional', ''),
    ('BatchedTensor', 'trailing_shape', 4, 3, 'repeated', ''),
    ('SampleResponse', 'sequences', 1, 11, 'repeated', ''),
    ('SampleResponse', 'prompt_logprobs', 2, 12, 'optional', '_prompt_logprobs'),
    ('SampleResponse', 'topk_prompt_logprobs', 3, 11, 'optional', '_topk_prompt_logprobs'),
    ('SampleResponse', 'prompt_cache_hit_tokens', 4, 5, 'optional', ''),
    ('SampleResponse', 'target_prompt_logprobs', 5, 11, 'optional', '_target_prompt_logprobs'),
    ('SampleResponse', 'prompt_alt_tokens', 6, 11, 'optional', '_prompt_alt_tokens'),
    ('SampledSequence', 'stop_reason', 1, 14, 'optional', ''),
    ('SampledSequence', 'tokens', 2, 12, 'optional', ''),
    ('SampledSequence', 'logprobs', 3, 12, 'optional', '_logprobs'),
    ('SampledSequence', 'topk_sampled_logprobs', 4, 11, 'optional', '_topk_sampled_logprobs'),
    ('TopkLogprobs', 'token_ids', 1, 12, 'optional', ''),
    ('TopkLogprobs', 'logprobs', 2, 12, 'optional', ''),
    ('TopkLogprobs', 'k', 3, 13, 'optional', ''),
    ('TopkLogprobs', 'length', 4, 13, 'optional', ''),
)

#: Field names of the SDK's pydantic models the wire surface parses or builds.
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "CreateModelRequest": ('base_model', 'lora_config', 'model_seq_id', 'optimizer_config', 'session_id', 'type', 'user_metadata'),
    "OptimStepRequest": ('model_id', 'optim_params', 'seq_id', 'type'),
    "SampleRequest": ('base_model', 'model_path', 'num_samples', 'prompt', 'prompt_alt_tokens_k', 'prompt_logprobs', 'prompt_logprobs_last_n', 'record_stability_info', 'sampling_params', 'sampling_session_id', 'seq_id', 'target_prompt_logprobs', 'topk_prompt_logprobs', 'topk_sample_logprobs', 'type'),
    "CreateCustomLossRequest": ('custom_loss_seq_id', 'graph', 'inputs', 'name', 'session_id', 'type'),
    "ClientConfigResponse": ('billing_exception_max_pause_duration_sec', 'credential_default_source', 'custom_loss_server_side', 'fwdbwd_dispatch_bytes_semaphore_size', 'fwdbwd_max_chunk_bytes_count', 'fwdbwd_max_chunk_len', 'inflight_response_bytes_semaphore_size', 'parallel_fwdbwd_chunks', 'pjwt_auth_enabled', 'proto_compress_fwdbwd', 'sample_dispatch_bytes_semaphore_size', 'sample_enable_stuck_detection', 'sample_join_sampling_session', 'sample_max_concurrent_requests', 'sample_no_retries', 'sample_use_retrieve_futures', 'use_pyqwest_transport'),
    "UntypedAPIFuture": ('model_id', 'request_id', 'sample_sequence_ids'),
    "GetInfoResponse": ('is_lora', 'lora_rank', 'model_data', 'model_id', 'model_name', 'optimizer_config', 'type'),
    "RequestFailedResponse": ('category', 'error'),
    "TryAgainResponse": ('queue_state', 'request_id', 'type'),
    "TrainingRun": ('base_model', 'corrupted', 'is_lora', 'last_checkpoint', 'last_request_time', 'last_sampler_checkpoint', 'lora_rank', 'model_owner', 'training_run_id', 'user_metadata'),
}


def _sdk_model(types: Any, name: str) -> Any:
    """The SDK's pydantic model ``name``: re-exported by ``tinker.types``, or only in its own module
    (``TryAgainResponse`` lives in ``tinker.types.try_again_response``); None when neither has it."""
    cls = getattr(types, name, None)
    if cls is None:
        module = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        try:
            cls = getattr(importlib.import_module(f"{types.__name__}.{module}"), name, None)
        except ImportError:
            return None
    return cls


@dataclasses.dataclass(frozen=True)
class SdkCheck:
    """The outcome: ``ok``, the installed version (None: not installed) and the first problem found."""

    ok: bool
    version: str | None
    problem: str = ""


def _installed_fingerprint() -> list[tuple[str, str, int, int, str, str]]:
    from tinker.proto import tinker_public_pb2 as pb

    messages = dict.fromkeys(m for m, *_ in WIRE_FINGERPRINT)
    out = []
    for full in messages:
        head, *nested = full.split(".")
        desc = pb.DESCRIPTOR.message_types_by_name.get(head)
        for part in nested:
            desc = None if desc is None else desc.nested_types_by_name.get(part)
        if desc is None:
            out.append((full, "<missing message>", 0, 0, "", ""))
            continue
        for f in desc.fields:
            label = "repeated" if f.is_repeated else "optional"
            out.append((full, f.name, f.number, f.type, label, f.containing_oneof.name if f.containing_oneof else ""))
    return out


@functools.lru_cache(maxsize=1)
def check_sdk() -> SdkCheck:
    """Check the installed ``tinker`` SDK against the supported range and the stored wire fingerprint."""
    from packaging.specifiers import SpecifierSet

    try:
        version = importlib.metadata.version("tinker")
    except importlib.metadata.PackageNotFoundError:
        return SdkCheck(False, None, f"the tinker SDK is not installed (supported: tinker{SUPPORTED}; install the "
                        "serve extra)")
    if version not in SpecifierSet(SUPPORTED):
        return SdkCheck(False, version, f"tinker {version} is installed; this losskit supports tinker{SUPPORTED}")
    try:
        installed = set(_installed_fingerprint())
    except ImportError as exc:
        return SdkCheck(False, version, f"tinker {version}: its protobuf schema cannot be imported ({exc})")
    for expected in WIRE_FINGERPRINT:
        if expected not in installed:
            same = [t for t in installed if t[:2] == expected[:2]]
            got = same[0] if same else "absent"
            return SdkCheck(False, version, f"tinker {version} (supported: tinker{SUPPORTED}): protobuf field "
                            f"{expected[0]}.{expected[1]} differs: expected {expected[2:]}, found {got if got == 'absent' else got[2:]}")
    from tinker import types

    for model, names in MODEL_FIELDS.items():
        cls = _sdk_model(types, model)
        found = tuple(sorted(cls.model_fields)) if cls is not None else ()
        missing = [n for n in names if n not in found]
        if missing:
            return SdkCheck(False, version, f"tinker {version} (supported: tinker{SUPPORTED}): model {model} lacks "
                            f"field {missing[0]}")
    return SdkCheck(True, version)
