# Sourced by the bench scripts whose runs resume after a kill.
# resume_if DIR: the flag that continues the run in DIR: `--resume` once it has a
# checkpoint, `--overwrite` when a run was killed before its first (the partial folder
# is moved aside, not deleted), nothing for a new folder.
resume_if() {
    if [ -d "$1/checkpoints" ]; then echo --resume; elif [ -d "$1" ]; then echo --overwrite; fi
}
