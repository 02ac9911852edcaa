"""Device models. Each sits behind a bus and sees only (base, offset, size)."""
