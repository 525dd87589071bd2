"""LoRA adapters: the per-architecture target table and one named ``peft`` adapter per training model.

There is one base model instance per (base model, device, dtype); each training model is one named adapter on
it (rank from the request, ``lora_alpha`` 32, dropout 0). Targets: attention ``q/k/v/o_proj``, MLP
``gate/up/down_proj`` and the unembedding ``lm_head``, switched by ``train_attn`` / ``train_mlp`` /
``train_unembed``. Unknown architectures fall back to matching ``nn.Linear`` module names (``attn``/``attention``,
``mlp``/``ffn``/``feed_forward``, and the output embedding); when nothing matches the answer is 400
``unsupported_architecture``. Adapters are initialised under ``torch.random.fork_rng`` seeded with the request's
``seed``, so equal seeds give identical adapters.
"""

from __future__ import annotations

import dataclasses
import secrets
import warnings

import torch
from torch import nn

from losskit.service.errors import ServiceError

LORA_ALPHA = 32
_LLAMA_LIKE = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}
#: Architectures whose module names are Llama's.
TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    arch: _LLAMA_LIKE for arch in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
        "GemmaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
        "SmolLM3ForCausalLM",
    )
}
MAX_RANK = 512


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings of one training model (validated at the edge)."""

    rank: int
    seed: int
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @staticmethod
    def make(rank, seed, train_attn=True, train_mlp=True, train_unembed=True) -> LoraSpec:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise ServiceError("validation_error", f"rank must be an int in [1, {MAX_RANK}], got {rank!r}",
                               detail={"argument": "rank"})
        if seed is None:
            seed = secrets.randbits(31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ServiceError("validation_error", f"seed must be a non-negative int, got {seed!r}",
                               detail={"argument": "seed"})
        for name, value in (("train_attn", train_attn), ("train_mlp", train_mlp), ("train_unembed", train_unembed)):
            if not isinstance(value, bool):
                raise ServiceError("validation_error", f"{name} must be a bool, got {value!r}",
                                   detail={"argument": name})
        if not (train_attn or train_mlp or train_unembed):
            raise ServiceError("validation_error", "at least one of train_attn, train_mlp, train_unembed must be "
                               "true (the adapter would have no parameters)")
        return LoraSpec(rank, seed, train_attn, train_mlp, train_unembed)


def _fallback_targets(model: nn.Module) -> dict[str, tuple[str, ...]]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "unembed": []}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lora_" in name or name.endswith("base_layer"):
            continue
        lowered = name.lower()
        if module is out:
            groups["unembed"].append(name)
        elif "attn" in lowered or "attention" in lowered:
            groups["attn"].append(name)
        elif "mlp" in lowered or "ffn" in lowered or "feed_forward" in lowered:
            groups["mlp"].append(name)
    return {k: tuple(v) for k, v in groups.items()}


def target_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The module names (peft ``target_modules``) the adapter of ``spec`` covers on ``model``."""
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    table = TARGETS.get(arch) or _fallback_targets(model)
    names = [*(table["attn"] if spec.train_attn else ()), *(table["mlp"] if spec.train_mlp else ()),
             *(table["unembed"] if spec.train_unembed else ())]
    if not names:
        raise ServiceError("unsupported_architecture",
                           f"architecture {arch!r} has no known LoRA targets for train_attn={spec.train_attn}, "
                           f"train_mlp={spec.train_mlp}, train_unembed={spec.train_unembed}")
    return names


def lora_config(model: nn.Module, spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, spec), init_lora_weights=True)


def add_adapter(peft_model, base: nn.Module, name: str, config, seed: int):
    """Add the named adapter (initialised from ``seed``); returns the ``PeftModel`` (created on first use)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # transformers deprecation notices triggered inside peft, not actionable here
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    peft_model.eval()  # always eval: no dropout, so forward-only and forward_backward logprobs agree
    return peft_model


def adapter_parameters(peft_model, name: str) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of one adapter, in module order (its optimizer's parameters)."""
    marker = f".{name}."
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n and marker in n + "."}
