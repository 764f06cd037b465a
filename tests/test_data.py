"""The class-incremental scenario builder and the embedded digits benchmark."""

import random

import numpy as np
import pytest
import torch

from promptcl.data.benchmarks import ClassIncremental, load_dataset, load_digits, seeded_class_order
from promptcl.data.preprocessing import HIDE


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_is_fixed_and_disjoint(digits):
    again = load_digits()
    assert len(digits.train) + len(digits.test) == 1797
    assert np.array_equal(digits.train_labels, again.train_labels)
    assert torch.equal(digits.test.tensors[0], again.test.tensors[0])
    # about 20% of every class is held out
    for c in range(10):
        n_test = (digits.test_labels == c).sum()
        n_all = n_test + (digits.train_labels == c).sum()
        assert abs(n_test - 0.2 * n_all) <= 1
    train_rows = {row.numpy().tobytes() for row in digits.train.tensors[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in digits.test.tensors[0])


def test_class_order_follows_the_reference_rule():
    expected = list(range(100))
    random.seed(42)
    random.shuffle(expected)
    assert seeded_class_order(100, 42) == expected
    # published CIFAR-100 seed-42 order starts 42 41 91 9 65 (norga.md 5.2)
    assert expected[:5] == [42, 41, 91, 9, 65]


def test_tasks_cover_classes_in_order_with_remapped_labels(digits):
    s = ClassIncremental(digits, increments=2, seed=3)
    order = seeded_class_order(10, 3)
    assert s.num_tasks == 5
    for t in range(5):
        assert list(s.task_classes(t)) == [2 * t, 2 * t + 1]
        labels = [y for _, y in s.train_dataset(t)]
        assert set(labels) == {2 * t, 2 * t + 1}
        originals = order[2 * t: 2 * t + 2]
        test_images, test_labels = map(torch.stack, zip(*[(x, torch.as_tensor(y)) for x, y in s.test_dataset(t)]))
        assert set(test_labels.tolist()) == {2 * t, 2 * t + 1}
        in_task = np.isin(digits.test_labels, originals)
        assert torch.equal(test_images, digits.test.tensors[0][torch.from_numpy(in_task)])
        # label 2t is the task's first class in the order, 2t + 1 its second
        expected = np.where(digits.test_labels[in_task] == originals[0], 2 * t, 2 * t + 1)
        assert test_labels.tolist() == expected.tolist()


def test_uneven_increments_and_explicit_order(digits):
    s = ClassIncremental(digits, increments=[4, 3, 3], class_order=list(range(9, -1, -1)))
    assert [list(s.task_classes(t)) for t in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert s.task_of_class().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # head output k is original class 9 - k
    images, labels = map(torch.stack, zip(*[(x, torch.as_tensor(y)) for x, y in s.train_dataset(0)]))
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for k in range(4):
        assert torch.equal(images[labels == k], digits.train.tensors[0][torch.from_numpy(digits.train_labels == 9 - k)])


@pytest.mark.parametrize("kwargs,match", [
    (dict(increments=3, seed=0), "does not divide"),
    (dict(increments=[5, 4], seed=0), "sum to 10"),
    (dict(increments=2), "exactly one of"),
    (dict(increments=2, seed=0, class_order=list(range(10))), "exactly one of"),
    (dict(increments=2, class_order=[0] * 10), "permutation"),
])
def test_ambiguous_or_bad_arguments_are_rejected(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassIncremental(digits, **kwargs)


@pytest.mark.parametrize("split", ["training", "test"])
def test_a_task_without_images_is_refused(split):
    from torch.utils.data import TensorDataset

    from promptcl.data.benchmarks import ClassificationData

    full, partial = torch.arange(8) % 4, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # no image of class 3
    train, test = (partial, full) if split == "training" else (full, partial)
    data = ClassificationData(train=TensorDataset(torch.zeros(8, 1, 2, 2), train), train_labels=train.numpy(),
                              test=TensorDataset(torch.zeros(8, 1, 2, 2), test), test_labels=test.numpy(),
                              num_classes=4, image_shape=(1, 2, 2))
    ClassIncremental(data, increments=2, class_order=[0, 1, 2, 3])  # task 1 still has class 2's images
    with pytest.raises(ValueError, match=rf"task 1 \(classes \[3\]\) has no {split} images"):
        ClassIncremental(data, increments=[3, 1], class_order=[0, 1, 2, 3])


def test_the_validation_split_is_stratified_seeded_and_apart_from_training(digits):
    s = ClassIncremental(digits, increments=2, seed=0, validation_fraction=0.1, validation_seed=5)
    again = ClassIncremental(digits, increments=2, seed=0, validation_fraction=0.1, validation_seed=5)
    other = ClassIncremental(digits, increments=2, seed=0, validation_fraction=0.1, validation_seed=6)
    assert np.array_equal(s.validation_indices, again.validation_indices)
    assert not np.array_equal(s.validation_indices, other.validation_indices)
    for c in range(10):  # about a tenth of every class
        assert abs((digits.train_labels[s.validation_indices] == c).sum() - 0.1 * (digits.train_labels == c).sum()) <= 0.5
    for t in range(s.num_tasks):
        train = set(s.train_dataset(t).subset.indices)
        held = set(s.validation_dataset(t).subset.indices)
        assert held and not train & held
        assert train | held == set(ClassIncremental(digits, increments=2, seed=0).train_dataset(t).subset.indices)
        assert {y for _, y in s.validation_dataset(t)} == set(s.task_classes(t))


def test_training_loader_is_reproducible(digits):
    s = ClassIncremental(digits, increments=2, seed=0)
    a = [y.tolist() for _, y in s.train_loader(1, batch_size=16, seed=7)]
    b = [y.tolist() for _, y in s.train_loader(1, batch_size=16, seed=7)]
    assert a == b


def test_batch_order_does_not_depend_on_the_loader_worker_count(digits):
    """Epoch after epoch, 0 and 2 loader workers (persistent across epochs) give the same batches,
    which are the ones a single-process loader sharing one generator with its RandomSampler gave
    (the behaviour before the order had a generator of its own), so earlier runs repeat exactly."""
    from torch.utils.data import DataLoader, RandomSampler

    def epochs(loader, n=3):
        return [[y.tolist() for _, y in loader] for _ in range(n)]

    loaders = {w: ClassIncremental(digits, increments=2, seed=0, num_workers=w).train_loader(1, batch_size=16, seed=7)
               for w in (0, 2)}
    assert loaders[2].num_workers == 2 and loaders[2].persistent_workers  # (the count is honoured)
    seeded = {w: epochs(loader) for w, loader in loaders.items()}
    assert seeded[0] == seeded[2]
    assert seeded[0][0] != seeded[0][1]  # a new order every epoch
    task = ClassIncremental(digits, increments=2, seed=0).train_dataset(1, augmented=True)
    shared = torch.Generator().manual_seed(7 * 1000 + 1)
    legacy = DataLoader(task, batch_size=16, sampler=RandomSampler(task, generator=shared), generator=shared)
    assert epochs(legacy) == seeded[0]


def test_unknown_dataset_and_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTCL_DATA", raising=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar1000")
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("cifar100", tmp_path / "nope")
    with pytest.raises(ValueError, match="cifar100 files not found.*missing cifar-100-python/train"):
        load_dataset("cifar100", tmp_path, HIDE)


def test_only_training_passes_read_the_augmented_view():
    """Training batches come from the training pipeline's view; statistics passes (the un-shuffled
    loader), plain train_dataset and the test sets from the un-augmented ones, unless asked."""
    from torch.utils.data import TensorDataset

    from promptcl.data.benchmarks import ClassificationData

    labels = torch.arange(8) % 4
    view = lambda value: TensorDataset(torch.full((8, 1, 2, 2), float(value)), labels)  # noqa: E731
    data = ClassificationData(train=view(0), test=view(2), train_labels=labels.numpy(), test_labels=labels.numpy(),
                              num_classes=4, image_shape=(1, 2, 2), train_augmented=view(1))
    s = ClassIncremental(data, increments=2, seed=0)

    def values(batches):
        return {float(x.unique()) for x, _ in batches}

    assert values(s.train_loader(0, batch_size=2, seed=0)) == {1.0}
    assert values(s.train_loader(0, batch_size=2, seed=0, shuffle=False)) == {0.0}
    assert values(s.train_loader(0, batch_size=2, seed=0, shuffle=False, augmented=True)) == {1.0}
    assert {float(x.unique()) for x, _ in s.train_dataset(1)} == {0.0}
    assert {float(x.unique()) for x, _ in s.train_dataset(1, augmented=True)} == {1.0}
    held = ClassIncremental(data, increments=2, seed=0, validation_fraction=0.5)  # validation: the test-time view
    assert values(held.validation_loader(0, batch_size=2)) == {0.0}
    assert values(s.test_loader(1, batch_size=2)) == {2.0}
