from setuptools import setup

setup(
    name="vitpatch",
    version="0.1.0",
    description="Triton kernels for window-masked, gated and patch-to-cluster attention in Vision Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested on 3.11-3.13 (vitpatch/_compat.py: what differs between versions)
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
                 "Programming Language :: Python :: 3.13"],
    packages=["vitpatch", "vitpatch.models", "vitpatch.analysis", "vitpatch.analysis.plots", "vitpatch.train",
              "vitpatch.kernels", "vitpatch.kernels.window"],
    package_dir={"vitpatch.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",  # tested with 2.11 (the GPU machine's) and 2.14.1
        "triton>=3.6; platform_system == 'Linux'",  # torch's own: 3.6.0 with torch 2.11, 3.8.0 with 2.14
        "timm>=1.0.17",
        "numpy>=2,<3",
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
