"""Authentication of the classical channel: bootstrap (PSK) and the per-frame MAC (qkdp-v2.md §12)."""
