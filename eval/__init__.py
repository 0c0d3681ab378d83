"""Evaluation helpers: offline assets (models, texts) and perplexity."""
