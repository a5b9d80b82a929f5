"""Pseudo-target images for TMCIR: an image editor applied to (reference image, modification text) pairs."""
