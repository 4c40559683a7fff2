"""Speculative decoding without a second model: host-side proposers, exact verification in the normal step."""
