"""Prompts of mixed lengths (token counts from a few to a few hundred)."""

import random

_WORDS = ("def class return import self value None True for while if else elif "
          "lambda yield with as try except finally raise assert print range len "
          "list dict set tuple str int float open read write path os sys").split()


def mixed_prompts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 200) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(min_words, max_words) if i % 3 else rng.randint(min_words, max(min_words, 8))
        out.append(" ".join(rng.choice(_WORDS) for _ in range(k)) + ":\n")
    return out
