"""Requests to the plain-HTTP servers tests run on loopback (gateways, Node-RED, the intake).

`httpx.get()` and friends build a client per call, and with it a TLS context that loads the CA
bundle: ~25-35 ms of CPU, although these URLs are plain http:// and nothing is verified. Tests
poll some of them every 0.1-0.2 s while the processes under test start beside them.
"""

from __future__ import annotations

from typing import Any

import httpx


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.request` for an http:// URL, without the TLS context it would never use."""
    if not url.startswith("http://"):
        raise ValueError(f"plain http:// URLs only, not {url!r}")
    return httpx.request(method, url, verify=False, **kwargs)  # noqa: S501 (no TLS here)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request("POST", url, **kwargs)
