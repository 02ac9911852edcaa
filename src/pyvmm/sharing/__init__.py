"""Sharing one host resource between devices and guests: rate limits (and, later,
the software switch and fair scheduling)."""
