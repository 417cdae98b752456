"""The OpenAI-compatible API access kind: client, access and a local server."""
