"""A small generated corpus (no download): sentences of a toy grammar, character-level.

The grammar has enough structure (agreement, fixed word spellings, punctuation) that a tiny
language model's loss falls visibly within a few hundred steps.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

SUBJECTS = ["the fox", "a dog", "the old cat", "my neighbour", "the small bird", "a sailor",
            "the expert", "every router", "the engineer", "a tired student"]
VERBS = ["sees", "follows", "helps", "watches", "finds", "dispatches", "combines", "routes"]
OBJECTS = ["the river", "a token", "the red house", "an expert", "the long road", "a quiet town",
           "the capacity buffer", "the last train"]
ENDINGS = [" today.", " at night.", " again.", ".", " in the morning.", " with care."]


def generate_text(num_sentences: int, seed: int = 0) -> str:
    """``num_sentences`` sentences of the toy grammar, deterministic in ``seed``."""
    rng = random.Random(seed)
    sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
                 for _ in range(num_sentences)]
    return " ".join(sentences)


class CharCorpus:
    """The corpus as a long tensor of character ids, with deterministic batches.

    Args:
        num_sentences: size of the generated text.
        seed: text seed.
    """

    def __init__(self, num_sentences: int = 20000, seed: int = 0) -> None:
        text = generate_text(num_sentences, seed)
        self.vocab = sorted(set(text))
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        self.ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def batch(self, step: int, rank: int, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Inputs and next-character targets ``[batch_size, seq_len]`` for ``(step, rank)``.

        A pure function of its arguments, so a resumed run sees exactly the batches it would have.
        """
        generator = torch.Generator().manual_seed(1_000_003 * step + rank)
        starts = torch.randint(0, self.ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        window = self.ids[starts.unsqueeze(1) + offsets]
        return window[:, :-1], window[:, 1:]
