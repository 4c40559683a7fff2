"""OpenAI's Responses API (POST /v1/responses and its stored responses) over the conversation core."""
