"""PaCa-ViT models registered with timm (SPEC §7)."""
