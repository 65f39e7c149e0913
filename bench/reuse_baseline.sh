# Sourced by the bench scripts that run one experiment per oracle setting.
# reuse_baseline FROM TO: copies FROM's "before RL" evaluation and each seed's finished
# baseline arm into the experiment folder TO, which then trains only its other arms
# (the baseline never asks the oracle, so it is the same arm). Files already in TO are
# kept, so a rerun resumes.
reuse_baseline() {
    local from=$1 to=$2 s
    [ -d "$from/before" ] || { echo "reuse_baseline: $from has no finished start yet" >&2; return 1; }
    mkdir -p "$to"
    cp -rn "$from/before" "$to/"
    for s in "$from"/seed-*; do
        mkdir -p "$to/$(basename "$s")"
        cp -rn "$s/baseline" "$to/$(basename "$s")/"
    done
}
