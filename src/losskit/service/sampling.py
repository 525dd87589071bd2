"""Sampling: parameters, the token choice, and the prefill/decode loop as fairness units.

Parameters: ``max_tokens`` (required on the native surface), ``temperature`` 1 (0 = greedy), ``top_k`` -1 (off),
``top_p`` 1, ``seed`` (a per-request ``torch.Generator``: the same seed, weights, device and batch give the same
tokens) and ``stop``: None = EOS, ``[]`` = none, strings = stop once the decoded text contains one, ints = stop
token ids. The generated tokens include the token that triggered the stop (``stop_reason="stop"``); otherwise the
reason is ``"length"``.

Returned logprobs are those of the distribution actually sampled: ``log_softmax(z/τ)`` restricted to the top-k /
top-p set and renormalised; greedy returns the untempered ``log_softmax(z)``. With default parameters they equal
the training logprobs, so they are the right behaviour-policy term of an importance ratio. Prompt logprobs are
NaN at position 0, then ``log p(prompt[i] | prompt[:i])`` at τ = 1.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Generator, Mapping
from typing import Any

import torch

from losskit.service.errors import ServiceError

_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    @staticmethod
    def from_mapping(values: Mapping[str, Any], *, eos_id: int | None, max_sample_tokens: int,
                     default_max_tokens: int | None = None) -> SamplingParams:
        values = dict(values)
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise ServiceError("validation_error", f"sampling_params: unknown key {unknown[0]!r} (accepted: "
                               f"{', '.join(_KEYS)})", detail={"argument": unknown[0]})
        max_tokens = values.get("max_tokens", default_max_tokens)
        if max_tokens is None:
            raise ServiceError("validation_error", "sampling_params.max_tokens is required",
                               detail={"argument": "max_tokens"})
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_sample_tokens:
            raise ServiceError("validation_error", f"sampling_params.max_tokens must be an int in [1, "
                               f"{max_sample_tokens}], got {max_tokens!r}", detail={"argument": "max_tokens"})
        temperature = _number(values.get("temperature", 1.0), "temperature", lambda v: v >= 0, ">= 0")
        top_p = _number(values.get("top_p", 1.0), "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        top_k = values.get("top_k", -1)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not (top_k == -1 or top_k >= 1):
            raise ServiceError("validation_error", f"sampling_params.top_k must be -1 (off) or >= 1, got {top_k!r}",
                               detail={"argument": "top_k"})
        seed = values.get("seed")
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ServiceError("validation_error", f"sampling_params.seed must be a non-negative int, got {seed!r}",
                               detail={"argument": "seed"})
        stop = values.get("stop")
        stop_ids: tuple[int, ...] = ()
        stop_strings: tuple[str, ...] = ()
        if stop is None:
            stop_ids = () if eos_id is None else (eos_id,)
        elif isinstance(stop, str):
            stop_strings = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
            stop_ids = tuple(stop)
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
            stop_strings = tuple(stop)
        else:
            raise ServiceError("validation_error", "sampling_params.stop must be null (EOS), [] (none), a list of "
                               f"token ids or a list of non-empty strings, got {stop!r}", detail={"argument": "stop"})
        return SamplingParams(max_tokens, temperature, top_k, top_p, seed, stop_ids, stop_strings)


def check_prompt(prompt: list[int], vocab_size: int) -> None:
    """A prompt to sample from: at least one token, every token in ``[0, vocab_size)``.

    Raises:
        ServiceError: ``validation_error`` for an empty prompt, ``token_out_of_range`` naming the first bad token.
    """
    if not prompt:
        raise ServiceError("validation_error", "prompt is empty", detail={"argument": "prompt"})
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ServiceError("token_out_of_range", f"prompt token {bad[0]} is outside the vocabulary [0, "
                           f"{vocab_size})", detail={"argument": "prompt"})


def _number(value, name, ok, rule) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ServiceError("validation_error", f"sampling_params.{name} must be a number {rule}, got {value!r}",
                           detail={"argument": name})
    return float(value)


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from ``logits`` ``[N, V]`` (-inf outside the kept set).

    ``log_softmax(z/τ)`` restricted to the top-k and then the top-p set and renormalised; for greedy
    (``temperature == 0``) the untempered ``log_softmax(z)``.
    """
    z = logits.float()
    if params.temperature == 0:
        return torch.log_softmax(z, dim=-1)
    z = z / params.temperature
    if params.top_k != -1 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each entry
        drop_sorted = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[N]`` and their logprobs ``[N]`` under ``params``."""
    logp = sampling_logprobs(logits, params)
    if params.temperature == 0:
        tokens = logits.float().argmax(-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


#: forward(input_ids [N, L], cache or None) -> (logits [N, L, V], cache)
Forward = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0


def _topk(logp: torch.Tensor, k: int) -> list[list[list[float]]]:
    values, ids = torch.topk(logp, k, dim=-1)
    return [[[int(i), float(v)] for i, v in zip(ri, rv)] for ri, rv in zip(ids.tolist(), values.tolist())]


def sample_units(forward: Forward, prompt: list[int], num_samples: int, params: SamplingParams, *,
                 decode: Callable[[list[int]], str], decode_slice: int, device: torch.device,
                 options: PromptOptions = PromptOptions()) -> Generator[None, None, dict[str, Any]]:
    """The sampling of one request as fairness units: the prefill, then slices of <= ``decode_slice`` tokens.

    A generator: each ``next()`` runs one unit; the ``StopIteration`` value is the result
    ``{"sequences": [{tokens, logprobs, stop_reason, text}], "prompt_logprobs"?, "topk_prompt_logprobs"?}``.
    The KV cache stays on the device between units.
    """
    generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    with torch.no_grad():
        logits, cache = forward(ids, None)
    result: dict[str, Any] = {}
    if options.prompt_logprobs or options.topk_prompt_logprobs:
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        if options.prompt_logprobs:
            values = [math.nan] + logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
            n = options.prompt_logprobs_last_n
            if n is not None:
                values = [math.nan] * max(len(values) - n, 0) + values[max(len(values) - n, 0):]
            result["prompt_logprobs"] = values
        if options.topk_prompt_logprobs:
            result["topk_prompt_logprobs"] = [None, *_topk(logp, options.topk_prompt_logprobs)]
    next_logits = logits[:, -1]
    yield
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    logprobs: list[list[float]] = [[] for _ in range(num_samples)]
    topk: list[list] = [[] for _ in range(num_samples)]
    reasons: list[str | None] = [None] * num_samples
    stop_ids = set(params.stop_ids)
    produced = 0
    while produced < params.max_tokens and None in reasons:
        for _ in range(decode_slice):
            with torch.no_grad():
                chosen, chosen_lp = choose(next_logits, params, generator)
                if options.topk_sample_logprobs:
                    step_topk = _topk(sampling_logprobs(next_logits, params), options.topk_sample_logprobs)
            produced += 1
            for i, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
                if reasons[i] is not None:
                    continue
                tokens[i].append(tok)
                logprobs[i].append(lp)
                if options.topk_sample_logprobs:
                    topk[i].append(step_topk[i])
                if tok in stop_ids or (params.stop_strings and any(s in decode(tokens[i])
                                                                   for s in params.stop_strings)):
                    reasons[i] = "stop"
                elif produced >= params.max_tokens:
                    reasons[i] = "length"
            if produced >= params.max_tokens or None not in reasons:
                break
            with torch.no_grad():
                logits, cache = forward(chosen[:, None], cache)
            next_logits = logits[:, -1]
        yield
    sequences = []
    for i in range(num_samples):
        seq = {"tokens": tokens[i], "logprobs": logprobs[i], "stop_reason": reasons[i] or "length",
               "text": decode(tokens[i])}
        if options.topk_sample_logprobs:
            seq["topk_logprobs"] = topk[i]
        sequences.append(seq)
    result["sequences"] = sequences
    return result
