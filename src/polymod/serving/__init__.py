"""``polymod serve``: many modules, one host, one batch, behind an OpenAI-compatible API.

* :mod:`~polymod.serving.engine` — the host, the module cache and the scheduler behind one object;
* :mod:`~polymod.serving.batching` — continuous batching with one composition per row;
* :mod:`~polymod.serving.kv` — the running batch's key/value cache as rows join and leave;
* :mod:`~polymod.serving.cache` — resident / memory / disk tiers keyed by content hash;
* :mod:`~polymod.serving.server` — the FastAPI routes; :mod:`~polymod.serving.openai_schema` their bodies;
* :mod:`~polymod.serving.metrics`, :mod:`~polymod.serving.security`, :mod:`~polymod.serving.sampling`,
  :mod:`~polymod.serving.text` — Prometheus text, API keys and body limits, token choice, streamed text.
* :mod:`~polymod.serving.vllm_engine` — ``--engine vllm``: vLLM's server as a process tree, with
  :mod:`~polymod.serving.vllm_plugin` (the LoRA resolver vLLM loads), :mod:`~polymod.serving.vllm_resolver`
  (hub names → verified modules), :mod:`~polymod.serving.vllm_peft` (PEFT LoRA directories, SVD beyond the rank)
  and :mod:`~polymod.serving.checkpoint_host` (host fingerprints checked against the served files).

See docs/serving.md.
"""
