"""Descriptors: SSCD copy-detection vectors, OpenCLIP embeddings, PDQ hashes, behind one small interface."""
