"""Upstream simulators the integration tests run the real proxy against."""
from .anthropic import AnthropicSimulator, Recorded, Reply, StreamInfo, plan_reply

__all__ = ["AnthropicSimulator", "Recorded", "Reply", "StreamInfo", "plan_reply"]
