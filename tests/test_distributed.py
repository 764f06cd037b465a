"""Data-parallel building blocks on a real 2-process gloo group: shards, exact reductions."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import SequentialSampler

from promptcl.core.alignment import ClassCentroids, ClassGaussians
from promptcl.distributed import ShardedBatchSampler, check_divisible, gather_in_order, sync_gradients


def test_sharded_batches_are_the_global_batches_split_across_ranks():
    sampler = SequentialSampler(range(23))
    ranks = [list(ShardedBatchSampler(sampler, 8, rank, 3)) for rank in range(3)]
    single = list(ShardedBatchSampler(sampler, 8, 0, 1))
    assert single == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23))]
    for step, batch in enumerate(single):
        parts = [r[step] for r in ranks if step < len(r)]
        assert sorted(i for p in parts for i in p) == batch
    # the last global batch has 7 samples: ranks hold 3, 2, 2; no padding duplicates
    assert [len(r[-1]) for r in ranks] == [3, 2, 2]
    assert ShardedBatchSampler(sampler, 8, 2, 3).global_steps() == 3
    # 17 samples, batch 8, 3 ranks: the last batch has one sample, only rank 0 gets a share
    tail = SequentialSampler(range(17))
    assert [len(ShardedBatchSampler(tail, 8, r, 3)) for r in range(3)] == [3, 2, 2]
    assert [len(list(ShardedBatchSampler(tail, 8, r, 3))) for r in range(3)] == [3, 2, 2]
    # a batch of 2 on 3 ranks (an evaluation batch smaller than the world): rank 2 never gets a share
    short = SequentialSampler(range(5))
    assert [len(list(ShardedBatchSampler(short, 2, r, 3))) for r in range(3)] == [3, 2, 0]
    assert [len(ShardedBatchSampler(short, 2, r, 3)) for r in range(3)] == [3, 2, 0]


def test_batch_size_must_divide_across_workers():
    check_divisible(32, 4)
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        check_divisible(32, 3)


def _data():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(23, 5, generator=g) * 3 + 1
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1, 0, 2, 2, 1, 1, 0, 3, 1, 0])
    return features, labels


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    features, labels = _data()
    shard = slice(rank, None, world)
    result = {}
    for cov in ("diag", "full"):
        stats = ClassGaussians(4, 5, covariance=cov)
        stats.fit(features[shard], labels[shard])
        result[cov] = (stats.mean.clone(), stats.cov.clone(), stats.fitted.clone())
    torch.manual_seed(rank)  # K-means restarts are seeded per run: rank 0's clustering must win everywhere
    mixture = ClassCentroids(4, 5, centroids=2)
    mixture.fit(features[shard], labels[shard])
    result["centroids"] = mixture.state_dict()
    result["gathered"] = gather_in_order(features[shard])
    # one step of the global mean loss; the unused extra parameter must keep grad=None
    model, unused = _model(), torch.nn.Parameter(torch.zeros(2))
    batch = slice(rank, 7, world)  # 7 samples: ranks get 4 and 3
    loss = torch.nn.functional.cross_entropy(model(features[batch]), labels[batch].clamp(max=2))
    loss.backward()
    sync_gradients([*model.parameters(), unused], local_count=len(labels[batch]))
    result["grads"] = [p.grad.clone() for p in model.parameters()]
    result["unused_grad"] = unused.grad
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_reduce_to_exactly_what_one_process_computes(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    features, labels = _data()
    for cov in ("diag", "full"):
        stats = ClassGaussians(4, 5, covariance=cov)
        stats.fit(features, labels)
        for r in ranks:
            mean, spread, fitted = r[cov]
            torch.testing.assert_close(mean, stats.mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(spread, stats.cov, rtol=0, atol=1e-5)
            assert fitted.tolist() == [True, True, True, True]
    # ClassGaussians agrees with numpy's unbiased estimates (class 3 has one sample: eps only)
    x = features[labels == 1].double().numpy()
    np.testing.assert_allclose(stats.cov[1].numpy(), np.cov(x.T) + 1e-4 * np.eye(5), atol=1e-5)
    np.testing.assert_allclose(stats.cov[3].numpy(), 1e-4 * np.eye(5), atol=1e-7)
    torch.manual_seed(0)
    mixture = ClassCentroids(4, 5, centroids=2)
    mixture.fit(features, labels)
    for r in ranks:  # rank 0 clusters the gathered data with its seed; rank 1 takes the result
        for key, value in mixture.state_dict().items():
            assert torch.equal(r["centroids"][key], value), key
    for r in ranks:
        assert torch.equal(r["gathered"], features)
        assert r["unused_grad"] is None
    model = _model()
    torch.nn.functional.cross_entropy(model(features[:7]), labels[:7].clamp(max=2)).backward()
    for r in ranks:
        for got, want in zip(r["grads"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _short_run(method: str):
    from promptcl.engine import RunSpec, resolve_run

    return resolve_run(RunSpec(method=method, dataset="digits", overrides={} if method == "simplecil" else {"epochs": 2}))


def _run_worker(rank: int, world: int, init: str, out: str, methods: list[str]) -> None:
    from promptcl.engine import run_sequence

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    for method in methods:
        summary = run_sequence(_short_run(method), f"{out}/{method}")
        torch.save(summary, f"{out}/{method}.{rank}.pt")
    dist.destroy_process_group()


def test_statistics_based_methods_on_two_ranks_match_one_process(tmp_path):
    """SimpleCIL's class means and S-Prompt's K-means centroids come from all ranks' data: on two
    ranks SimpleCIL is exactly the single-process run and S-Prompt infers exactly the same tasks.
    OVOR's outlier epochs draw from all ranks' features and continue each rank's (synchronised)
    training optimizer: both ranks end with the same model, close to the single process's."""
    from promptcl.engine import run_sequence

    methods = ["simplecil", "sprompt", "ovor"]
    mp.spawn(_run_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path), methods), nprocs=2, join=True)
    for method in methods:
        single = run_sequence(_short_run(method), tmp_path / f"{method}-single")
        ranks = [torch.load(tmp_path / f"{method}.{r}.pt", weights_only=False) for r in range(2)]
        assert ranks[0]["accuracy_matrix"] == ranks[1]["accuracy_matrix"]
        # the training work is summed over the ranks' shards: the whole run's, on every rank
        assert ranks[0]["training_work"] == ranks[1]["training_work"] == single["training_work"]
        # and so are the un-prompted passes (each rank passed its shard; OVOR makes none)
        assert ranks[0]["frozen_images_computed"] == ranks[1]["frozen_images_computed"] \
            == single["frozen_images_computed"] > (-1 if method == "ovor" else 0)
        if method == "simplecil":
            assert ranks[0]["accuracy_matrix"] == single["accuracy_matrix"]
        elif method == "ovor":  # gradients summed in another order: within ~3 of the 360 test images
            assert abs(ranks[0]["final_average_accuracy"] - single["final_average_accuracy"]) < 1
        else:
            assert ranks[0]["task_identity_matrix"] == single["task_identity_matrix"]
            assert abs(ranks[0]["final_average_accuracy"] - single["final_average_accuracy"]) < 2


def _empty_shard_worker(rank: int, world: int, init: str, out: str) -> None:
    """Rank 1 holds no batch of the task (a task smaller than the world, or an evaluation batch
    smaller than it): it must still join the reductions and agree with rank 0."""
    from promptcl.core.backbone import build_backbone
    from promptcl.data.benchmarks import load_dataset
    from promptcl.engine import evaluate
    from promptcl.methods import get_method
    from promptcl.methods.base import TaskInfo

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    cls = get_method("dualprompt")
    method = cls(cls.PRESETS["small"], backbone=build_backbone("vit_digits", pretrained=True),
                 num_classes=10, num_tasks=5)
    method.begin_task(TaskInfo(0, range(0, 2), 5))
    test = load_dataset("digits").test
    batch = (torch.stack([test[i][0] for i in range(6)]), torch.tensor([test[i][1] for i in range(6)]))
    mine = [batch] if rank == 0 else []
    features, labels = method.collect_features(method.frozen_features, mine, prompted=False)
    stats = ClassGaussians(10, method.embed_dim)
    stats.fit(features, labels)
    evaluation = evaluate(method, mine, torch.device("cpu"), 0)
    torch.save({"features": features, "mean": stats.mean, "evaluation": evaluation}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_rank_with_an_empty_shard_joins_the_reductions(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_empty_shard_worker, args=(2, f"file://{tmp_path}/pg", out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert ranks[0]["features"].shape == (6, 64) and ranks[1]["features"].shape == (0, 64)
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"]) and ranks[0]["mean"].abs().sum() > 0
    # the task-identity score is reported on every rank, the one without a test batch included
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"]
    assert ranks[0]["evaluation"].task_identity is not None and ranks[0]["evaluation"].n_samples == 6
