"""Training: the generic loop, batch sources, method training and backbone pretraining."""
