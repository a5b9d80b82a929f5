"""Blocks shared by methods."""
