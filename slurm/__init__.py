"""Slurm: sbatch rendering from cluster profiles, submission of phase chains, requeue after pre-emption,
and the status of a run (docs/slurm.md).

    slurm.profiles  cluster profiles (YAML): load and validate
    slurm.render    the launch shape, the checks before submission, the sbatch scripts (templates/)
    slurm.submit    plan a run's jobs from a recipe, write them into RUN/slurm/, submit them chained
    slurm.rank      the per-rank entry under torchrun: records each rank's exit code for the job
    slurm.status    where a run stands, from its run directory and scontrol
    slurm.cli       `communs slurm render|submit|status|prepare-data`
"""
