"""``gsa serve``: an OpenAI-compatible HTTP server with continuous batching over constant-memory sessions.

The pieces, one job each: :mod:`~gsa_serve.runners` (the model's forward over stored pasts),
:mod:`~gsa_serve.batch` (sessions decoding together), :mod:`~gsa_serve.prefix_cache` (states after
prefixes), :mod:`~gsa_serve.sampler` and :mod:`~gsa_serve.text` (each row's next token and its text),
:mod:`~gsa_serve.engine` (the thread that runs it all), :mod:`~gsa_serve.limits`,
:mod:`~gsa_serve.metrics`, :mod:`~gsa_serve.schemas` (the OpenAI request and response models),
:mod:`~gsa_serve.app` (the FastAPI application) and :mod:`~gsa_serve.command` (``gsa serve``).
See docs/serving.md.
"""
