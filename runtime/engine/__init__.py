"""The engine: requests, sampling parameters, scheduler, KV-cache manager, output processing and the LLM facade."""
