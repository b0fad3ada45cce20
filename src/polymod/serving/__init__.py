"""``polymod serve``: many modules, one host, one batch, behind an OpenAI-compatible API.

* :mod:`~polymod.serving.engine` — the host, the module cache and the scheduler behind one object;
* :mod:`~polymod.serving.batching` — continuous batching with one composition per row;
* :mod:`~polymod.serving.kv` — the running batch's key/value cache as rows join and leave;
* :mod:`~polymod.serving.cache` — resident / memory / disk tiers keyed by content hash;
* :mod:`~polymod.serving.server` — the FastAPI routes; :mod:`~polymod.serving.openai_schema` their bodies;
* :mod:`~polymod.serving.metrics`, :mod:`~polymod.serving.security`, :mod:`~polymod.serving.sampling`,
  :mod:`~polymod.serving.text` — Prometheus text, API keys and body limits, token choice, streamed text.

See docs/serving.md.
"""
