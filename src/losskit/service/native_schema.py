"""Request bodies of the native ``/v1`` surface as pydantic models (strict types, unknown fields rejected).

They document the API in the server's OpenAPI schema (``GET /openapi.json``) and do the first, structural
validation; the deeper checks (rows, tensors, loss inputs, config keys, token ranges) happen in the operations.
A validation failure is a 400 that names the field, never a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WaitS = Annotated[float | None, Field(default=None, ge=0, le=25, description="wait up to this long for the result "
                                      "(200 with the result when it finished in time, else 202 with the request id)")]
SeqId = Annotated[int | None, Field(default=None, ge=1, le=2**62, description="this model's request number; "
                                    "omitted: the server assigns the next one")]
Alias = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                             description="the model's name within the session")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SessionRequest(Body):
    client: str | None = Field(default=None, max_length=256, description="free-form client description")


class CreateModelRequest(Body):
    model_id: Alias | None = None
    base_model: str | None = Field(default=None, max_length=4096)
    rank: int = Field(default=16, ge=1, le=512)
    seed: int | None = Field(default=None, ge=0, le=2**62)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    wait_s: WaitS = None


class ForwardBackwardRequest(Body):
    model_id: Alias
    seq_id: SeqId = None
    data: list[Any] = Field(description="rows: token lists, {tokens}, {text}, {messages} or Tinker datums")
    loss_fn: str = Field(default="cross_entropy", max_length=128)
    loss_fn_inputs: dict[str, Any] | None = None
    loss_fn_config: dict[str, Any] | None = None
    forward_only: bool = False
    tensor_encoding: Literal["list", "b64"] = Field(
        default="list", description='how result tensors (logprobs) travel: JSON lists, or "b64" tensor JSON')
    wait_s: WaitS = None


class OptimStepRequest(Body):
    model_id: Alias
    seq_id: SeqId = None
    adam_params: dict[str, Any] | None = None
    wait_s: WaitS = None


class SaveStateRequest(Body):
    model_id: Alias
    seq_id: SeqId = None
    name: str = Field(max_length=128)
    overwrite: bool = False
    ttl_seconds: float | None = Field(default=None, gt=0)
    wait_s: WaitS = None


class SaveForSamplerRequest(SaveStateRequest):
    """The same fields as ``SaveStateRequest``; the checkpoint holds the adapter weights only."""


class LoadStateRequest(Body):
    path: str = Field(max_length=1024)
    model_id: Alias | None = None
    seq_id: SeqId = None
    optimizer: bool = True
    wait_s: WaitS = None


class SampleRequest(Body):
    model_id: Alias | None = None
    model_path: str | None = Field(default=None, max_length=1024)
    base_model: str | None = Field(default=None, max_length=4096)
    seq_id: SeqId = None
    prompt: list[int] | str
    num_samples: int = Field(default=1, ge=1)
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = Field(default=None, ge=0)
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=64)
    topk_sample_logprobs: int = Field(default=0, ge=0, le=64)
    wait_s: WaitS = None


class RetrieveRequest(Body):
    request_id: str = Field(max_length=128)
    timeout_s: float = Field(default=25.0, ge=0, le=25)


class RegisterLossRequest(Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    description: str | None = Field(default=None, max_length=1024)
    graph: dict[str, Any] | None = Field(default=None, description="a losskit.native/1 torch.fx graph")
    format: str | None = Field(default=None, description='"cloudpickle" for the opt-in pickled upload')
    payload_b64: str | None = None
    python: str | None = Field(default=None, max_length=32)
    torch: str | None = Field(default=None, max_length=64)
    cloudpickle: str | None = Field(default=None, max_length=64)


class LegacyRegisterRequest(Body):
    loss_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    loss_fn_serialized: str
