"""``losskit serve``: a training server for HF causal LMs with LoRA adapters, built-in and custom losses.

Modules, each with one job (lowest first):

* ``allowlist``, ``custom_loss``, ``fx_trace``: custom losses as data (torch.fx graphs rebuilt from the
  server's own table of allowed operations). They import only torch, the standard library and
  ``losskit.contract``, so ``losskit.client`` can trace and check losses without the server extras.
* ``errors``, ``tensors``, ``settings``: the JSON error model, the tensor JSON codec, the validated flags.
* ``models``, ``lora``, ``optim``, ``sampling``, ``checkpoints``, ``losses``, ``batch``, ``backend``: the model
  layer (the built-in ``losskit/tiny-lm``, local HF directories), one peft adapter and one AdamW per training
  model, sampling, atomic checkpoints, the loss bindings and batching; the backend runs them on one device.
* ``futures``, ``ordering``, ``worker``, ``sessions``, ``engine``: per-model ``seq_id`` order, de-duplication,
  the bounded futures store with long-poll, the fair device worker and session ownership. The engine is
  surface-neutral: an HTTP surface only parses, validates and encodes.
* ``auth``, ``metrics``, ``app``, ``native``: keys, Prometheus metrics, the FastAPI app and the native ``/v1``
  surface; ``cli`` is ``losskit serve``.

Importing this package imports nothing heavy (no transformers, peft or fastapi).
"""
