"""`mertools verify`: integrity (structure, sizes, checksums) and numerics (logits vs a reference)."""
