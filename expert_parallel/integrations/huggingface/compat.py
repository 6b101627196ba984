"""What depends on the transformers release: the supported range, the releases it is tested on,
the version check, the one private transformers API the conversion reads (the running model's
output collector), behind one function, and transformers' loading internals that
``from_pretrained`` and the sharded ``save_pretrained`` use (``loading_internals``), and the
causal-LM class of a config (``causal_lm_class``)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Optional

import transformers
from packaging.version import Version

try:  # private: where transformers 5.22-5.25 collect outputs recorded by forward hooks
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # a release that moved it: convert refuses (check_recording)
    _active_collector = None

# the releases the specs (block classes, state-dict keys, config fields) and the output recording
# are tested on; the CI runs the Hugging Face tests under the oldest and the newest (.ci/hf_newest.sh)
TESTED_TRANSFORMERS = ("5.22.2", "5.25.0")
SUPPORTED_TRANSFORMERS = ">=5.22,<5.26"
_OLDEST, _NEWEST = Version("5.22"), Version("5.26")


def causal_lm_class(config: transformers.PretrainedConfig) -> type:
    """The causal LM class of ``config``: ``AutoModelForCausalLM`` 's mapping, or the family's own
    ``<Name>ForCausalLM`` where the mapping leaves it out (Mistral 4 in 5.22-5.25).

    Raises:
        ValueError: neither exists (the config is not a causal LM's).
    """
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = mapping.get(config.model_type) or type(config).__name__.removesuffix("Config") + "ForCausalLM"
    if not hasattr(transformers, name):
        raise ValueError(f"config model_type={config.model_type!r} has no causal-LM class in transformers "
                         f"{transformers.__version__} (looked for {name}); pass a causal LM's config or directory")
    return getattr(transformers, name)


def check_transformers_version(version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed transformers) is in ``SUPPORTED_TRANSFORMERS``.

    A newer release is accepted (``False``): ``convert`` then relies on its structural checks
    (block classes, state-dict keys, config fields, output recording), which refuse with
    ``mismatch`` errors where the release changed what a spec reads, and warns when they pass.

    Raises:
        ValueError: a release older than the range (transformers 4's blocks hold one module per
            expert, other keys).
    """
    version = transformers.__version__ if version is None else version
    if Version(version) < _OLDEST:
        raise ValueError(f"transformers {version} is installed, and expert_parallel.integrations.huggingface supports "
                         f"transformers{SUPPORTED_TRANSFORMERS} (the versions its conversions are verified against); "
                         f'install one: pip install "transformers{SUPPORTED_TRANSFORMERS}"')
    return Version(version) < _NEWEST


def warn_untested() -> None:
    """The warning of a conversion under a release newer than the tested ones, once every
    structural check passed."""
    warnings.warn(f"transformers {transformers.__version__} is newer than the releases expert_parallel.integrations."
                  f"huggingface is tested on ({', '.join(TESTED_TRANSFORMERS)}); converting, since every block class, "
                  "state-dict key and config field its specs read is as expected. Compare the converted model's "
                  f'logits with the original once, or install "transformers{SUPPORTED_TRANSFORMERS}"', stacklevel=3)


def mismatch(message: str) -> ValueError:
    """The ``ValueError`` of a structural check (``message``), naming the release when it is newer
    than the tested ones (the likely cause)."""
    version = transformers.__version__
    if Version(version) >= _NEWEST:
        message += (f". transformers {version} is newer than the newest release tested ({TESTED_TRANSFORMERS[-1]}) "
                    f'and may have changed this: install "transformers{SUPPORTED_TRANSFORMERS}"')
    return ValueError(message)


def check_recording() -> None:
    """Raise (``mismatch``) unless this release collects recorded outputs where ``recorded`` reads them."""
    if _active_collector is None or not callable(getattr(_active_collector, "get", None)):
        raise mismatch("transformers.utils.output_capturing._active_collector, where transformers collects the "
                       "router logits of output_router_logits=True, is missing; the converted blocks could not "
                       "record theirs")


def recorded(key: str) -> Optional[list]:
    """The list the running model collects ``key`` outputs in (e.g. ``router_logits`` while
    ``output_router_logits=True``), else ``None``. Hugging Face fills it from forward hooks on its
    router class; a converted block has no module of that class and appends its own."""
    collected = _active_collector.get()
    if collected is None or key not in collected:
        return None
    return collected[key]


def loading_internals() -> SimpleNamespace:
    """transformers' checkpoint-key machinery, imported when first needed (so that ``convert``
    works whatever a release does to it): ``get_model_conversion_mapping``, ``rename_source_key``,
    ``WeightConverter``, ``WeightRenaming``, ``dot_natural_key``, ``revert_weight_conversion``
    (``transformers.conversion_mapping`` / ``core_model_loading``) and
    ``convert_file_size_to_int`` (``transformers.utils.hub``).

    Raises:
        ValueError (``mismatch``): a release that moved one of them.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
            revert_weight_conversion,
        )
        from transformers.utils.hub import convert_file_size_to_int
    except ImportError as error:
        raise mismatch(f"transformers' checkpoint-key machinery, which from_pretrained and the sharded save_pretrained "
                       f"use, moved ({error}); load with transformers and convert instead") from None
    return SimpleNamespace(get_model_conversion_mapping=get_model_conversion_mapping,
                           rename_source_key=rename_source_key, WeightConverter=WeightConverter,
                           WeightRenaming=WeightRenaming, dot_natural_key=dot_natural_key,
                           revert_weight_conversion=revert_weight_conversion,
                           convert_file_size_to_int=convert_file_size_to_int)
