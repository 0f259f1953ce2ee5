"""Leaf modules every layer may import: the user-error type and atomic file writes."""
