from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "paced_ds" / "__init__.py").read_text(), version)

setup(
    name="paced-ds",
    version=version["__version__"],
    description="DeepSpeed distillation of LLMs at the frontier of student competence (PACED)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    if (Path(__file__).parent / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["paced_ds", "paced_ds.*"]),
    package_data={"paced_ds": ["assets/*/*", "assets/*.json", "assets/architectures/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "accelerate>=1.1",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "math-verify>=0.7",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyarrow>=15",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8", "trl>=0.19", "gguf>=0.19", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["paced-ds=paced_ds.cli:main"]},
)
