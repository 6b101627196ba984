from setuptools import find_packages, setup

setup(
    name="expert_parallel",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts runtime for PyTorch, DeepSpeed-compatible",
    packages=find_packages(include=["expert_parallel", "expert_parallel.*"]),
    python_requires=">=3.9",
    # torch 2.8: the first release with torch._grouped_mm (filled expert compute) and DeviceMesh's
    # _init_backend (checkpoints); tested on 2.13. numpy: gloo's all_gather_object (every-rank
    # checks, checkpoints) unpickles through tensor.numpy(), which torch does not install.
    install_requires=["torch>=2.8", "numpy"],
    extras_require={
        # the demo training job and the benchmarks' progress bars
        "launch": ["tqdm"],
        "deepspeed": ["deepspeed>=0.14"],
        # launch.train --tensorboard (torch.utils.tensorboard needs the tensorboard package); launch.report
        "tensorboard": ["tensorboard"],
        "report": ["matplotlib"],
        "telemetry": ["nvidia-ml-py"],
        "bench": ["tqdm", "numpy", "matplotlib"],
        # the benchmark's DeepSpeed AutoEP baseline only: the Mixtral model it is measured on, in the
        # releases DeepSpeed 0.19.8's AutoEP reads (AUTOEP_TRANSFORMERS, benchmarks/baselines.py says why)
        "autoep": ["transformers>=5.1,<5.23"],
        # expert_parallel.integrations.huggingface: the transformers releases its conversions are tested
        # on (SUPPORTED_TRANSFORMERS in integrations/huggingface/compat.py; docs/huggingface.md)
        "huggingface": ["transformers>=5.22,<5.26"],
        "dev": ["pytest", "pytest-timeout", "ruff"],
    },
)
