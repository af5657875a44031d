"""[pure] The OpenAI Chat Completions API (to be written: issue 7)."""
from __future__ import annotations


class OpenAIAdapter:
    name = "openai"
    path = "/v1/chat/completions"
    default_max_tokens = 16384
