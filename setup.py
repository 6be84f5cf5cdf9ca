from setuptools import setup

setup(
    name="vitpatch",
    version="0.1.0",
    description="Triton kernels for window-masked, gated and patch-to-cluster attention in Vision Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["vitpatch", "vitpatch.models", "vitpatch.analysis", "vitpatch.kernels"],
    package_dir={"vitpatch.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "timm>=1.0.17",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "opencv-python-headless"],
        "semantic": ["opencv-python-headless"],
    },
    entry_points={"console_scripts": ["vitpatch = vitpatch.cli:main"]},
)
