"""Sparse attention (prefill patterns, decode selection) and KV-cache sparsity."""
