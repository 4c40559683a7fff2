"""What stands between the internet and the engine: API keys, rate limits, request limits."""
