"""Captioning: the MCoT prompt, its parser, the resumable caption cache and the captioning backends."""
