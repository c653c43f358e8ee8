"""Sparse training and sparse fine-tuning (masks kept through optimizer steps)."""
