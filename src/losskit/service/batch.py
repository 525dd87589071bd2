"""Native request data -> one padded batch: rows, the shift rule, inputs, padding and token checks.

A row is one of: a token list or ``{"tokens": [...]}``; ``{"text": str}`` (tokenised with the model's tokenizer;
EOS is appended if the tokenizer adds none); ``{"messages": [{"role", "content"}]}`` (rendered with the chat
template, weights 1 only on assistant content and the EOS that ends each assistant turn); or a Tinker datum as
JSON ``{"model_input": {"chunks": [...]}, "loss_fn_inputs": {...}}``, whose inputs join the top-level ones.

**Shift rule.** The server shifts only when the loss reads ``target_tokens`` and the request does not supply it:
then the model input is ``row[:-1]``, ``target_tokens = row[1:]`` and ``weights`` are ones (or the chat mask), and
every other per-token input must have length ``len(row) - 1``. Otherwise rows are model inputs as given and
per-token inputs have the row's length.

**Batching.** Rows are right-padded to the longest with the tokenizer's pad token (else 0); ``attention_mask``
``[B, T]`` is 1 on real tokens. A per-row input is a list of rows (ragged or not) or a ``[B, T, ...]`` tensor; rows
are padded with 0 (integers: a valid index, masked out), 0.0 or false. A ``[B]`` tensor (one value per row) and any
other shape pass unchanged. Token ids are checked against the vocabulary before any lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from losskit.service.errors import ServiceError
from losskit.service.models import BaseInfo
from losskit.service.tensors import decode_rows, decode_tensor


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded native batch.

    Attributes:
        input_ids: ``[B, T]`` int64.
        attention_mask: ``[B, T]`` float32 (1 real, 0 padding).
        lengths: each row's length.
        inputs: ``loss_fn_inputs`` after the shift rule, padded (per-token tensors are ``[B, T, ...]``).
        shifted: whether the server derived ``target_tokens`` (and ``weights``) from the rows.
        datum_inputs: per-datum inputs, unpadded, for losses that run once per datum (Tinker custom losses).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: tuple[int, ...]
    inputs: dict[str, torch.Tensor]
    shifted: bool
    datum_inputs: tuple[dict[str, torch.Tensor], ...] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def _bad(message: str, argument: str = "data", code: str = "validation_error") -> ServiceError:
    return ServiceError(code, message, detail={"argument": argument})


def _token_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not set(map(type, value)) <= {int}:  # exactly int: bools are refused
        raise _bad(f"{where} must be a list of token ids (ints)")
    return value


def render_messages(info: BaseInfo, messages: Any, where: str) -> tuple[list[int], list[float]]:
    """Tokens and weights of a conversation: 1 on assistant content and the EOS closing its turn, else 0.

    The template is rendered message by message (each message's text is what it adds to the rendered prefix),
    so the weights follow the model's own chat template.
    """
    tok = info.tokenizer
    if not getattr(tok, "chat_template", None):
        raise _bad(f"{where}: base model {info.name!r} has no chat template; send tokens or text rows")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["role"], str)
            and isinstance(m["content"], str) for m in messages):
        raise _bad(f"{where}.messages must be a non-empty list of {{role, content}} strings")
    ids: list[int] = []
    weights: list[float] = []
    previous = ""
    eos = tok.eos_token or ""
    for k, message in enumerate(messages):
        text = tok.apply_chat_template(messages[: k + 1], tokenize=False)
        if not text.startswith(previous):
            raise _bad(f"{where}: the chat template of {info.name!r} does not render conversations "
                       "incrementally; send tokens with weights instead")
        segment, previous = text[len(previous):], text
        pieces: list[tuple[str, float]] = [(segment, 0.0)]
        if message["role"] == "assistant" and message["content"]:
            at = segment.find(message["content"])
            if at >= 0:
                head, body = segment[:at], message["content"]
                tail = segment[at + len(body):]
                pieces = [(head, 0.0), (body, 1.0)]
                if eos and tail.startswith(eos):
                    pieces += [(eos, 1.0), (tail[len(eos):], 0.0)]
                else:
                    pieces.append((tail, 0.0))
        for piece, weight in pieces:
            if piece:
                piece_ids = tok(piece, add_special_tokens=False).input_ids
                ids += piece_ids
                weights += [weight] * len(piece_ids)
    return ids, weights


def _row(row: Any, i: int, info: BaseInfo) -> tuple[list[int], list[float] | None, dict[str, Any]]:
    """``(tokens, chat weights or None, the row's own loss_fn_inputs)``."""
    where = f"data[{i}]"
    if isinstance(row, list):
        return _token_list(row, where), None, {}
    if not isinstance(row, dict):
        raise _bad(f"{where} must be a token list or an object with tokens, text, messages or model_input")
    if set(row) == {"tokens"}:
        return _token_list(row["tokens"], f"{where}.tokens"), None, {}
    if set(row) == {"text"}:
        if not isinstance(row["text"], str):
            raise _bad(f"{where}.text must be a string")
        ids = list(info.tokenizer(row["text"]).input_ids)
        if info.eos_id is not None and (not ids or ids[-1] != info.eos_id):
            ids.append(info.eos_id)
        return ids, None, {}
    if set(row) == {"messages"}:
        ids, weights = render_messages(info, row["messages"], where)
        return ids, weights, {}
    if "model_input" in row and set(row) <= {"model_input", "loss_fn_inputs"}:
        chunks = row["model_input"].get("chunks") if isinstance(row["model_input"], dict) else None
        if not isinstance(chunks, list):
            raise _bad(f"{where}.model_input must be {{\"chunks\": [...]}}")
        ids: list[int] = []
        for j, chunk in enumerate(chunks):
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                raise ServiceError("unsupported_feature", f"{where}.model_input.chunks[{j}]: only encoded_text chunks "
                                   "are supported", detail={"argument": "data"})
            ids += _token_list(chunk.get("tokens"), f"{where}.model_input.chunks[{j}].tokens")
        own = row.get("loss_fn_inputs", {})
        if not isinstance(own, dict):
            raise _bad(f"{where}.loss_fn_inputs must be an object")
        return ids, None, own
    raise _bad(f"{where} has keys {sorted(row)}; expected tokens, text, messages, or model_input (+ loss_fn_inputs)")


def _padded_lists(rows: Sequence[list], length: int, value) -> list[list]:
    return [r + [value] * (length - len(r)) for r in rows]


def _pad(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    trailing = rows[0].shape[1:]
    out = torch.zeros((len(rows), length, *trailing), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _per_token(name: str, value: Any, lengths: Sequence[int], padded: int, rule: str) -> torch.Tensor:
    """Pad a per-row input to ``[B, padded, ...]`` after checking each row's length."""
    B = len(lengths)
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != B:
            return value  # [B] per-row values and other shapes pass unchanged
        if value.shape[1] == padded:
            return value
        if all(n == value.shape[1] for n in lengths):
            return _pad(list(value), padded)
        raise _bad(f"loss_fn_inputs[{name!r}] has shape {tuple(value.shape)}; per-token inputs must be [B, T] with T "
                   f"the padded length {padded} or each row's length ({rule})", argument=name, code="shape_mismatch")
    rows = list(value)
    if len(rows) != B:
        raise _bad(f"loss_fn_inputs[{name!r}] has {len(rows)} rows, expected {B} (one per data row)", argument=name,
                   code="shape_mismatch")
    for i, (r, n) in enumerate(zip(rows, lengths)):
        if r.dim() == 0 or r.shape[0] != n:
            got = "a scalar" if r.dim() == 0 else f"length {r.shape[0]}"
            raise _bad(f"loss_fn_inputs[{name!r}][{i}] has {got}, expected {n} ({rule})", argument=name,
                       code="shape_mismatch")
    if len({(r.dtype, r.shape[1:]) for r in rows}) != 1:
        raise _bad(f"loss_fn_inputs[{name!r}]: rows differ in dtype or trailing shape", argument=name,
                   code="shape_mismatch")
    return _pad(rows, padded)


def _check_tokens(name: str, t: torch.Tensor, vocab: int, mask: torch.Tensor | None = None) -> None:
    if t.dtype != torch.int64:
        raise _bad(f"{name} must be integer token ids, got {t.dtype}", argument=name)
    bad = (t < 0) | (t >= vocab)
    if mask is not None:
        bad = bad & mask.reshape(mask.shape + (1,) * (t.dim() - mask.dim())).bool()
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ServiceError("token_out_of_range", f"{name}: token id {int(t[tuple(where)])} at position {where} is "
                           f"outside the vocabulary [0, {vocab})", detail={"argument": name, "position": where})


def build_batch(data: Any, loss_fn_inputs: Mapping[str, Any] | None, info: BaseInfo, *, needs_target_tokens: bool,
                max_rows: int, max_len: int) -> Batch:
    """Validate and pad one native request (see the module docstring). Every failure is a 400 naming the argument."""
    if not isinstance(data, list) or not data:
        raise _bad("data must be a non-empty list of rows")
    if len(data) > max_rows:
        raise _bad(f"data has {len(data)} rows, above the limit of {max_rows} (--max-datums-per-request)")
    rows, chat, own_inputs = [], [], []
    for i, row in enumerate(data):
        ids, weights, own = _row(row, i, info)
        if not ids:
            raise _bad(f"data[{i}] is empty")
        rows.append(ids)
        chat.append(weights)
        own_inputs.append(own)
    top = dict(loss_fn_inputs or {})
    if not all(isinstance(k, str) for k in top):
        raise _bad("loss_fn_inputs keys must be strings", argument="loss_fn_inputs")
    keys = set(top) | {k for own in own_inputs for k in own}
    for k in keys:
        if k in top and any(k in own for own in own_inputs):
            raise _bad(f"loss_fn_inputs[{k!r}] is given both at the top level and in a datum", argument=k)
    shifted = needs_target_tokens and "target_tokens" not in keys
    if shifted:
        short = [i for i, r in enumerate(rows) if len(r) < 2]
        if short:
            raise _bad(f"data[{short[0]}] has fewer than 2 tokens; with target_tokens derived from the rows (shifted "
                       "by one), each row needs at least 2")
        targets = [r[1:] for r in rows]
        weights = [([1.0] * (len(r) - 1)) if w is None else w[1:] for r, w in zip(rows, chat)]
        rows = [r[:-1] for r in rows]
        rule = "target_tokens were derived from the rows (row[1:]), so per-token inputs have length len(row) - 1"
    else:
        rule = "rows are model inputs as given, so per-token inputs have the row's length"
    lengths = [len(r) for r in rows]
    if max(lengths) > max_len:
        i = lengths.index(max(lengths))
        raise ServiceError("context_exceeded", f"data[{i}] has {lengths[i]} tokens, above the limit of {max_len}",
                           detail={"argument": "data"})
    T = max(lengths)
    B = len(rows)
    # One tensor from padded Python lists: cheaper than a copy per row.
    input_ids = torch.tensor(_padded_lists(rows, T, info.pad_id), dtype=torch.long)
    mask = torch.tensor(_padded_lists([[1.0] * n for n in lengths], T, 0.0), dtype=torch.float32)
    if min(min(r) for r in rows) < 0 or max(max(r) for r in rows) >= info.vocab_size:
        _check_tokens("data", input_ids, info.vocab_size, mask)
    inputs: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if key in top:
            value = decode_rows(top[key], f"loss_fn_inputs[{key!r}]")
        else:
            missing = [i for i, own in enumerate(own_inputs) if key not in own]
            if missing:
                raise _bad(f"data[{missing[0]}].loss_fn_inputs lacks {key!r}, which other datums have", argument=key)
            value = [decode_tensor(own[key], f"data[{i}].loss_fn_inputs[{key!r}]") for i, own in enumerate(own_inputs)]
        inputs[key] = _per_token(key, value, lengths, T, rule)
    if shifted:
        inputs["target_tokens"] = torch.tensor(_padded_lists(targets, T, 0), dtype=torch.long)
        if "weights" not in inputs:
            inputs["weights"] = torch.tensor(_padded_lists(weights, T, 0.0), dtype=torch.float32)
    if "target_tokens" in inputs:
        tt = inputs["target_tokens"]
        if tt.dtype != torch.int64 or tt.dim() < 2 or tt.shape[:2] != (B, T):
            raise _bad(f"loss_fn_inputs['target_tokens'] must be integer ids of shape [B, T] or [B, T, K] ({rule}), got "
                       f"{tt.dtype} {tuple(tt.shape)}", argument="target_tokens", code="shape_mismatch")
        _check_tokens("target_tokens", tt, info.vocab_size, mask)
    return Batch(input_ids=input_ids, attention_mask=mask, lengths=tuple(lengths), inputs=inputs, shifted=shifted)
