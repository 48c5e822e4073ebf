"""Multi-phase training under DeepSpeed: recipes, data mixture, atomic checkpoints, the loop, the launcher.

    train.recipe      the recipe schema (typed dataclasses), loading + validation, derived values,
                      the generated DeepSpeed config
    train.mixture     deterministic data mixture: which window of which source goes in each slot
    train.checkpoint  atomic checkpoint commit, integrity check, resume scan, RNG state
    train.telemetry   metrics.jsonl, wandb, console progress, MFU, run-directory files
    train.loop        the per-rank entry `run(recipe, run_dir)` and the visible `train_step`
    train.export      a phase's weights as a Hugging Face folder (RUN/export/<phase>/)
    train.rank        one rank (`python -m train`): its arguments, validation again, the loop
    train.cli         `communs train RECIPE [key=value ...]`: validate, write the run dir, launch torchrun

Exit codes of `communs train` and of each rank (`python -m train`): EXIT_OK when every phase is done,
EXIT_REQUEUE when the run stopped on a signal (SIGTERM/SIGUSR1/SIGINT) or `--stop-at-step` after committing a
checkpoint (the Slurm layer requeues the job, which resumes from it), 2 for bad input (UserError),
anything else is a failure.
"""

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the run is resumable from its last checkpoint
