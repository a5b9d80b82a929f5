"""Experiments on the synthetic world: the demo and its profiles, ablations, benchmarks of speed, views of what a
model learned, and the report they write. They use the library; nothing in the library imports them."""
