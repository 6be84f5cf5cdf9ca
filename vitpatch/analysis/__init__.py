"""Patch-interaction analysis: attention maps, uncertainty U, adaptive windows, DIP, responsive fields (SPEC §2-5)."""
