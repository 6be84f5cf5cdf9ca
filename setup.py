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
        "torch>=2.14",  # the version the suite ran on (2.14.1); the compile gate also passes with triton 3.6
        "triton>=3.6; platform_system == 'Linux'",  # compile gate: 3.8.0 full matrix, 3.6.0 the CI subset
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
