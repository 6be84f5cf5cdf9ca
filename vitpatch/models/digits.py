"""``vit_digits_patch4_32``: the demo's small ViT as a registered timm model.

The default model of ``vitpatch train`` when no ``--data`` is given: scikit-learn's bundled
digits, written once as an ImageFolder of 32x32 PNGs (:func:`vitpatch.train.data.write_digits_folder`),
seen through 4x4 patches (an 8x8 grid, 64 patches + CLS). The same architecture as
:func:`vitpatch.demo.make_vit` (width 64, depth 4, 4 heads, MLP ratio 2) but with three input
channels, since an image folder is read as RGB. Registering it lets every command that takes a
timm name (``vitpatch windows``, ``train``, ``eval``) use it.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["vit_digits_patch4_32"]

default_cfgs = generate_default_cfgs({
    "vit_digits_patch4_32": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
        "crop_mode": "center", "interpolation": "bilinear", "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj", "classifier": "head",
        "notes": ("scikit-learn's digits upsampled to 32x32 (vitpatch train's default data); no weights",),
    },
})


@register_model
def vit_digits_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT with 4x4 patches on 32x32 inputs, width 64, depth 4, 4 heads, MLP ratio 2, CLS token."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10,
                class_token=True, global_pool="token")
    return build_model_with_cfg(VisionTransformer, "vit_digits_patch4_32", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**args, **kwargs})
