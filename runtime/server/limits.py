"""The server's default request limits, shared by the flags (cli_args.py) and the ASGI guard (guard.py); no imports,
so parsing pllm-serve's flags stays light."""

MAX_BODY_BYTES = 4 * 2**20  # as vLLM's h11 limit after CVE-2025-48956
REQUEST_BODY_TIMEOUT_S = 60.0  # a 4 MiB body at 70 KB/s still makes it
MAX_REQUEST_ID_LEN = 128  # an X-Request-Id header or a body's request_id longer than this is not echoed


def usable_request_id(request_id: str) -> bool:
    """Whether a client's X-Request-Id (or body request_id) is echoed: printable ASCII, 1..MAX_REQUEST_ID_LEN long."""
    return 0 < len(request_id) <= MAX_REQUEST_ID_LEN and request_id.isprintable() and request_id.isascii()
