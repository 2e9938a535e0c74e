"""Watermark and provenance-mark readers: invisible marks, visible-watermark probability, C2PA, metadata."""
