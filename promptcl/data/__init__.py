"""Class-incremental benchmarks and their loaders."""

# How a run orders the classes (here, not in benchmarks.py, so the command line reads it without torch):
# "seeded": random.seed(seed); random.shuffle(range(C)), the rule of the reference repositories that
# shuffle; "natural": the dataset's own order, as HiDe-Prompt's scripts run (they never pass --shuffle);
# "seeded-except-0": seeded, but the dataset's own order at seed 0, as CODA-Prompt's trainer and those
# built on it (VQ-Prompt, OVOR) shuffle only `if seed > 0`
CLASS_ORDERS = ("seeded", "natural", "seeded-except-0")
