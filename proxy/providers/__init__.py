"""[pure] Provider adapters: request facts, usage extraction, stream meters, error shapes."""
