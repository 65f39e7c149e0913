"""Reads a cal-grpo TensorBoard log with TensorBoard's own reader and checks scalars.

usage: python scripts/check_tensorboard.py LOGDIR TAG=STEP:VALUE ...
Exits non-zero (with a message) when a tag, step or value is missing or wrong.
"""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> int:
    logdir, expectations = sys.argv[1], sys.argv[2:]
    acc = EventAccumulator(logdir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    print(f"{len(tags)} scalar tags: {', '.join(sorted(tags))}")
    for exp in expectations:
        tag, rest = exp.rsplit("=", 1)
        step, value = rest.split(":")
        events = {e.step: e.value for e in acc.Scalars(tag)}
        got = events.get(int(step))
        if got is None or abs(got - float(value)) > 1e-4 * max(1.0, abs(float(value))):
            print(f"{tag} at step {step}: expected {value}, found {got} (all: {events})")
            return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
