"""The seed's ``@custom_loss(client, name="...")`` decorator.

``custom_loss(client, name=None, *, mode="graph", description=None)`` registers the loss when the decorator runs
and returns the original function, unchanged and still callable locally, with ``_registered_name``, ``_client``
and ``graph`` (the traced ``torch.fx.GraphModule``; None for ``mode="pickle"``) attached. There is never a fallback
to pickling: ``mode="pickle"`` must be asked for, and the server must allow it.
"""

from __future__ import annotations

from collections.abc import Callable


def custom_loss(client, name: str | None = None, *, mode: str = "graph",
                description: str | None = None) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        registered = name or fn.__name__
        client.register_custom_loss(registered, fn, mode=mode, description=description)
        traced = client._traced.get(registered) if mode == "graph" else None
        fn._registered_name = registered
        fn._client = client
        fn.graph = traced.graph_module if traced is not None else None
        return fn

    return register
