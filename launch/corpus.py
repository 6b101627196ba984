"""The demo's corpora, character-level, nothing downloaded:

- ``bierce`` (default): Ambrose Bierce's *The Devil's Dictionary* (public domain English prose and
  verse, 383 KB), shipped in ``launch/data/`` (source and licence: ``launch/data/README.md``);
- ``toy``: sentences of a generated toy grammar, with enough structure (agreement, fixed word
  spellings, punctuation) that a tiny language model's loss falls visibly within a few hundred steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor

CORPORA = ("bierce", "toy")
BIERCE = Path(__file__).resolve().parent / "data" / "devils_dictionary.txt"

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


def corpus_text(name: str) -> str:
    """The text of corpus ``name`` (one of ``CORPORA``); ValueError for another name."""
    if name == "bierce":
        return BIERCE.read_text(encoding="ascii")
    if name == "toy":
        return generate_text(20000)
    raise ValueError(f"corpus {name!r} is unknown; choose one of {list(CORPORA)}")


class CharCorpus:
    """A text as a long tensor of character ids, with deterministic batches.

    Character ``c`` has id ``vocab.index(c)`` (the text's distinct characters, sorted), so a
    model trained on one corpus reads the same ids in every later run.

    Args:
        text: the corpus; ``None`` means the toy grammar (``generate_text(num_sentences, seed)``).
        num_sentences: size of the generated text when ``text`` is ``None``.
        seed: its seed.
    """

    def __init__(self, text: str | None = None, num_sentences: int = 20000, seed: int = 0) -> None:
        text = generate_text(num_sentences, seed) if text is None else text
        self.vocab = sorted(set(text))
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        self.ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)

    @classmethod
    def named(cls, name: str) -> CharCorpus:
        """The corpus ``name`` (``"bierce"`` or ``"toy"``, see the module docstring)."""
        return cls(corpus_text(name))

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of character ids."""
        return "".join(self.vocab[i] for i in ids.tolist())

    def batch(self, step: int, rank: int, batch_size: int, seq_len: int, world: int = 1) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s share of step ``step``'s global batch (``world * batch_size`` windows):
        inputs and next-character targets ``[batch_size, seq_len]``.

        A pure function of the step and the global batch, so a resumed run sees exactly the batches
        it would have, at any world size that keeps the global batch.
        """
        generator = torch.Generator().manual_seed(1_000_003 * step)
        starts = torch.randint(0, self.ids.numel() - seq_len - 1, (world * batch_size,), generator=generator)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]
        offsets = torch.arange(seq_len + 1)
        window = self.ids[starts.unsqueeze(1) + offsets]
        return window[:, :-1], window[:, 1:]
