"""Reads a cal-grpo TensorBoard log with TensorBoard's own reader and checks scalars.

usage: python scripts/check_tensorboard.py LOGDIR TAG=STEP:VALUE ... [TAG=STEP:none ...]
Exits non-zero (with a message) when a tag, step or value is missing or wrong, when a
step expected absent (`none`) is there, or when a tag holds one step twice.
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
        steps = [e.step for e in acc.Scalars(tag)]
        if len(steps) != len(set(steps)):
            print(f"{tag}: a step is logged twice: {steps}")
            return 1
        events = {e.step: e.value for e in acc.Scalars(tag)}
        got = events.get(int(step))
        if value == "none":
            if got is not None:
                print(f"{tag} at step {step}: expected nothing, found {got} (all: {events})")
                return 1
            continue
        if got is None or abs(got - float(value)) > 1e-4 * max(1.0, abs(float(value))):
            print(f"{tag} at step {step}: expected {value}, found {got} (all: {events})")
            return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
