"""Entry points: ``python -m launch.train`` (plain, torchrun, deepspeed launcher, SLURM)."""
