from setuptools import find_packages, setup

# Tested pins live in requirements.txt (`make venv` installs them); these are the ranges.
setup(
    name="owlore-ds",
    version="0.1.0",
    description="Memory-efficient full-parameter LLM fine-tuning (OwLore, GaLore, LISA, LOMO) on DeepSpeed ZeRO",
    packages=find_packages(include=["owlore_ds", "owlore_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "deepspeed>=0.19", "transformers>=5.0", "datasets", "accelerate", "safetensors",
        "sentencepiece", "protobuf", "galore-torch", "pyyaml", "tqdm",
    ],
    extras_require={"mpi": ["mpi4py"], "test": ["pytest"]},
)
