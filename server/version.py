"""Minerva's installed version, for `minerva --version`, GET /version and the OpenAPI document."""

from __future__ import annotations


def minerva_version() -> str:
    import importlib.metadata  # here, not at the top: `minerva inspect` should not pay for it

    try:
        return importlib.metadata.version("minerva")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
