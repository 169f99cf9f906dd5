"""The caesar-gpt generation service: continuous batching over gpt/'s KV cache behind TGI- and
OpenAI-compatible HTTP APIs. Start it with `python -m service`; build it with `service.app.create_app`."""
