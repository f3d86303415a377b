"""Triton kernels (installed as vllm_bastion.kernels)."""
