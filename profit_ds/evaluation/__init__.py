"""Scoring (ROUGE-L, exact match) and batched generation."""
