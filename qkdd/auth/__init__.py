"""Authentication of the classical channel: bootstrap (PSK) and the per-frame MAC (qkdp-v1.md §12)."""
