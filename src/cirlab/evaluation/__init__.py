"""Evaluation: pure metrics, benchmark protocols, gallery feature caching."""
