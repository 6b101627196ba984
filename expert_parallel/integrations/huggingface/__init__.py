"""Hugging Face transformers integration: ``convert`` a model's sparse-MoE blocks to expert-parallel
``MoELayer`` s in place, ``to_hf_state_dict`` to save it back under the original keys;
``from_pretrained`` to load a converted model reading only this rank's experts.

This package is the only code of ``expert_parallel`` that imports ``transformers``; the core runs
without it. Supported blocks and versions: ``families.SPECS``, ``SUPPORTED_TRANSFORMERS`` (tested
on ``TESTED_TRANSFORMERS``); see docs/huggingface.md.
"""

from .block import ExpertParallelBlock
from .compat import SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS, causal_lm_class, check_transformers_version
from .convert import convert, to_hf_state_dict
from .families import SPECS
from .loading import from_pretrained
from .specs import BlockSpec, WeightMap

__all__ = ["SPECS", "SUPPORTED_TRANSFORMERS", "TESTED_TRANSFORMERS", "BlockSpec", "ExpertParallelBlock", "WeightMap",
           "causal_lm_class", "check_transformers_version", "convert", "from_pretrained", "to_hf_state_dict"]
