"""Class-incremental benchmarks and their loaders."""

# How a run orders the classes (here, not in benchmarks.py, so the command line reads it without torch):
# "seeded": random.seed(seed); random.shuffle(range(C)), the rule of the reference repositories that
# shuffle; "natural": the dataset's own order, as HiDe-Prompt's scripts run (they never pass --shuffle)
CLASS_ORDERS = ("seeded", "natural")
