"""Paper reproductions: sweep definitions (`<study>/sweep.py`), the runner and the report.

The `finetune_jax` package never imports this package.
"""
