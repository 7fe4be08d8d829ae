"""The OpenAI-compatible HTTP server: CLI, app, engine thread, protocol, serving, SSE, metrics."""


def __getattr__(name: str):
    # `pllm.runtime.server:main` was pllm-serve's entry point before the server became a package; scripts installed
    # then still name it. Imported lazily so `import pllm.runtime.server.protocol_chat` stays light.
    if name == "main":
        from pllm.runtime.server.cli import main

        return main
    raise AttributeError(f"module 'pllm.runtime.server' has no attribute {name!r}")
