"""PaCa-ViT models registered with timm (paper 004, Table 1; docs/math.md §7).

Importing this package registers ``paca_vit_b0``, ``paca_vit_b1``, ``paca_vit_b2`` (Table 1), their
CIFAR-100 settings ``paca_vit_b0_c100``, ``paca_vit_b1_c100``, ``paca_vit_b2_c100`` (Table 1's C100
column, Table 3) and ``paca_vit_tiny``, ``paca_vit_small``, ``paca_vit_base`` (the authors'
released configurations) with timm, and ``vit_digits_patch4_32`` (the small ViT of ``vitpatch train``'s
default digits data); ``import vitpatch`` alone does not import it (nor timm)::

    import timm, vitpatch.models
    model = timm.create_model("paca_vit_b0", num_classes=100)
"""
from .digits import vit_digits_patch4_32
from .paca_vit import (PaCaBlock, PaCaStage, PaCaViT, PaCaViTAttention, PaCaViTClustering, checkpoint_filter_fn,
                       load_official_checkpoint, paca_vit_b0, paca_vit_b0_c100, paca_vit_b1, paca_vit_b1_c100,
                       paca_vit_b2, paca_vit_b2_c100, paca_vit_base, paca_vit_small, paca_vit_tiny)

__all__ = ["PaCaViT", "PaCaBlock", "PaCaStage", "PaCaViTAttention", "PaCaViTClustering", "checkpoint_filter_fn",
           "load_official_checkpoint", "paca_vit_b0", "paca_vit_b1", "paca_vit_b2", "paca_vit_tiny", "paca_vit_small",
           "paca_vit_base", "paca_vit_b0_c100", "paca_vit_b1_c100", "paca_vit_b2_c100",
           "vit_digits_patch4_32"]
