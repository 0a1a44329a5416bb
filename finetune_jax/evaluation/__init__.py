"""Evaluation: metrics, the eval loop over a split, and generation for causal LMs."""
