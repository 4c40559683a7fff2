"""Minerva's installed version, for `minerva --version`, GET /version and the OpenAPI document."""

from __future__ import annotations

import importlib.metadata


def minerva_version() -> str:
    try:
        return importlib.metadata.version("minerva")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
