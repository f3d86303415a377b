"""Offline tooling, never imported by the serving path.

  training.py   trains the project's model pair (target + DFlash drafter)
  scale_pair.py widens a trained pair function-preservingly to a bigger cost
  oracle.py     test utilities that run inside vLLM workers
"""
