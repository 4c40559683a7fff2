"""Metrics and request logs: what an operator sees of a running server."""
