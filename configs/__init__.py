"""Per-device roofline priors (roofline/) and example speculative configs
(examples/); installed as vllm_bastion.configs."""
