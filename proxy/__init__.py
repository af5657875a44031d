"""budget-proxy: an LLM gateway that never lets a budget be overspent."""
