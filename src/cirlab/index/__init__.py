"""Vector index backends (exact, FAISS) and the persistent image index over them."""
from cirlab.index.backends import (BACKENDS, COARSE, FAISS_KINDS, ExactBackend, FaissBackend, MilvusBackend,
                                   VectorBackend, backend_class, check_settings, make_backend)
from cirlab.index.store import ImageIndex, check_id

__all__ = ["BACKENDS", "COARSE", "FAISS_KINDS", "ExactBackend", "FaissBackend", "ImageIndex", "MilvusBackend",
           "VectorBackend", "backend_class", "check_id", "check_settings", "make_backend"]
