"""Input: task definitions, data sources, text / chat batching, and the per-task loaders."""
