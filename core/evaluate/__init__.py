"""Evaluation: metrics against stakes and glacier-wide balances, pooled summaries and tables."""
