"""torch.distributed (gloo, 2 and 3 processes on CPU): the Hessian passes shard their calibration batches over the
ranks and all-reduce every HVP, evaluation splits its hardware repeats; both give what one process gives. LAFT
trains data-parallel (DistributedDataParallel, each rank a slice of every global batch): one epoch per stage
gives one process's weights, rank 0 alone writes the checkpoints, and a LAFT run killed under torchrun
resumes to the uninterrupted result."""

import contextlib
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import hetcomp
from hetcomp.errors import ConfigError, DataError
from hetcomp.finetune.data import TrainingData
from hetcomp.targets.base import TargetSet
from hetcomp.targets.registry import get

SETTINGS = {"probes": 4, "max_iter": 6, "batches": 4}


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store: str, **kwargs) -> Iterator[None]:
    """A gloo process group for one spawned test rank (one thread). The ranks meet at a barrier before they tear it
    down, so no rank closes its connections while another still uses them (a rank once aborted at exit without
    it, "terminate called without an active exception", in a fresh-clone run); on an error it is torn down at once."""
    torch.set_num_threads(1)
    kwargs.setdefault("timeout", datetime.timedelta(minutes=5))  # a rank left waiting fails the test, not CI's hour
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, **kwargs)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return model, batches


def metrics(compiled):
    keys = ("hessian_trace", "lambda_max", "hni", "scr")
    return {layer["name"]: {key: layer["metrics"][key] for key in keys} | {
        "row_sensitivity": layer["metrics"]["row_sensitivity"]} for layer in compiled.manifest.layers}


def _rank(rank, world, store, out):
    with gloo_group(rank, world, store):
        model, batches = model_and_data()
        compiled = hetcomp.compile(model, "pcm+digital", data=batches, strategy="hni-only", hessian=SETTINGS)
        from hetcomp.analysis.hessian import HessianOperator

        params = [model[0].weight, model[2].weight, model[4].weight]
        operator = HessianOperator(model, params, batches, nn.functional.cross_entropy,
                                   process_group=dist.group.WORLD)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        accuracies = compiled.evaluate((x, y), repeats=5, seed=3).accuracies
        saved = compiled.save(f"{out}.dir", onnx=False)  # rank 0 writes, every rank returns the same folder
        assert (saved / "manifest.json").exists()
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"metrics": metrics(compiled), "graphs": len(operator._graphs), "accuracies": accuracies},
                      handle)


@pytest.mark.parametrize("world", [2, 3])  # 3 ranks: 4 batches do not divide evenly
def test_sharded_hessian_metrics_equal_one_process(tmp_path, world):
    model, batches = model_and_data()
    compiled = hetcomp.compile(model, "pcm+digital", data=batches, strategy="hni-only", hessian=SETTINGS)
    single = metrics(compiled)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    single_accuracies = compiled.evaluate((x, y), repeats=5, seed=3).accuracies
    assert compiled.manifest.summary["mac_ratio"]["pcm"] > 0  # analog layers: the repeats differ and are split
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path / "metrics")), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"metrics.{rank}").read_text()) for rank in range(world)]
    graphs = [r["graphs"] for r in results]
    assert sum(graphs) == 4 and max(graphs) == -(-4 // world)  # each rank holds only its share of the graphs
    # hardware repeats split over the ranks (repeat r keeps its seed), gathered in order on every rank
    assert all(r["accuracies"] == single_accuracies for r in results)
    ranks = [r["metrics"] for r in results]
    assert all(r == ranks[0] for r in ranks[1:])  # every rank computed the same metrics
    for name, expected in single.items():
        for key, value in expected.items():
            assert ranks[0][name][key] == pytest.approx(value, rel=1e-5, abs=1e-8), (name, key)


def split_data_task():
    """An MLP on PCM with its per-read output noise (drawn per repeat and chunk, so the same on any rank), 100 samples
    in chunks of 16 (7 chunks, the last of 4): 50 queries, then their documents (each query plus noise). Recall@1
    pairs query i (chunks 0-3) with document i (chunks 3-6), so parts gathered out of chunk order would pair the
    wrong documents."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    queries = torch.randn(50, 6)
    x = torch.cat([queries, queries + 0.7 * torch.randn(50, 6)])
    y = (x @ torch.randn(6, 8)).argmax(1)
    compiled = hetcomp.compile(model, "pcm+digital", (x[:2],), strategy="all-analog")
    return compiled, (x, y)


def _queries_then_documents(parts):
    from hetcomp.zoo.docstrings import rank_metrics

    queries, documents = nn.functional.normalize(torch.cat(parts), dim=-1).chunk(2)
    return rank_metrics(queries, documents)


def split_data_values(compiled, data, repeats):
    """Per-repeat accuracy and whole-dataset Recall@1 (with MRR) over ``repeats`` repeats, in chunks of 16; the
    accuracy again with one repeat per group (``fold_bytes=1``) and on aihwkit's tiles (``exact_tiles=True``)."""
    from hetcomp.metrics import DatasetMetric

    retrieval = DatasetMetric(lambda outputs, labels: outputs, _queries_then_documents, "recall@1")
    accuracy = compiled.evaluate(data, repeats=repeats, seed=3, batch_size=16)
    recall = compiled.evaluate(data, repeats=repeats, seed=3, batch_size=16, metric=retrieval)
    single_groups = compiled.evaluate(data, repeats=repeats, seed=3, batch_size=16, fold_bytes=1)
    tiles = compiled.evaluate(data, repeats=repeats, seed=3, batch_size=16, exact_tiles=True)
    return {"accuracy": accuracy.accuracies, "recall@1": recall.values, "mrr": recall.others["mrr"],
            "single_groups": single_groups.accuracies, "tiles": tiles.accuracies,
            "methods": [accuracy.method, recall.method, tiles.method]}


def _split_data_rank(rank, world, store, out, repeats):
    with gloo_group(rank, world, store):
        import hetcomp.evaluate as evaluation
        import hetcomp.lower.aihwkit_repeats as aihwkit_repeats

        shares, drawn, programmed = [], [], []

        class Recording(evaluation.RepeatRunner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                shares.append([[group, list(chunks)] for group, chunks in self.work])

        def programmed_states(module, lowered, seeds, t_inference):  # a shared group's part drawn here
            drawn.append(len(list(seeds)))
            return states(module, lowered, seeds, t_inference)

        def program(layer, t_inference, program_seeds):  # every draw of a PCM layer's realizations
            programmed.append(len(program_seeds))
            return draws(layer, t_inference, program_seeds)

        states, draws = evaluation.programmed_states, aihwkit_repeats.program
        # in this spawned process only
        evaluation.RepeatRunner, evaluation.programmed_states, aihwkit_repeats.program = (
            Recording, programmed_states, program)
        compiled, (x, y) = split_data_task()
        values = split_data_values(compiled, (x, y), repeats)
        values["drawn"], values["largest_draw"] = list(drawn), max(programmed)
        # The last rank forgets its fold probes (as if the others had run the module alone before): it probes again
        # and holds the probe's realizations, the others reuse theirs; all must still plan the same exchange.
        if rank == world - 1:
            evaluation._FOLD_PROBES.clear()
        values["probe_forgotten"] = compiled.evaluate((x, y), repeats=repeats, seed=3, batch_size=16).accuracies
        if repeats != 2:  # a draw fails on the last rank only: every rank raises its error, none waits for it
            def failing(module, lowered, seeds, t_inference):
                if rank == world - 1:
                    raise ValueError(f"drawing failed on rank {rank}")
                return states(module, lowered, seeds, t_inference)

            evaluation.programmed_states = failing
            with pytest.raises(ValueError, match=f"drawing failed on rank {world - 1}"):
                compiled.evaluate((x, y), repeats=repeats, seed=3, batch_size=16)
            evaluation.programmed_states = programmed_states
        # A label out of range in the last chunk: only the last rank reads it, and every rank raises its error
        # (none waits in the gather for it).
        bad = y.clone()
        bad[-1] = 8
        with pytest.raises(DataError, match="label"):
            compiled.evaluate((x, bad), repeats=repeats, seed=3, batch_size=16)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({**values, "shares": shares[:2]}, handle)


# drawn: per rank, how many repeats' programming it drew for a group it shares, per evaluation (accuracy, recall,
# one repeat per group; a rank in two shared groups draws twice). One group of 5 on 2 ranks: parts of 2 and 3; on 3
# ranks: 1, 2 and 2. One repeat per group: 5 groups over 7 chunks, the shares cut by cost (chunks of 16 samples and
# a last of 4): on 2 ranks group 2 is shared (rank 0 runs its chunks 0-2) and rank 1 draws it; on 3 ranks group 1 is
# shared by ranks 0 and 1 (chunks 0-3 and 4-6) and group 3 by ranks 1 and 2 (0-1 and 2-6). 2 repeats on 3 ranks: parts
# of 0, 1 and 1, the group being shared although every rank drew it in the first evaluation's fold probe (whether a
# group is drawn in parts follows from the plan, not from what a rank holds: the later evaluations reuse the probe
# and hold none). largest: the most repeats any one draw of a layer held on that rank (the first evaluation's probe
# draws 2): never the whole shared group.
@pytest.mark.parametrize(("world", "repeats", "drawn", "largest"), [
    (2, 1, [[0, 0, 0], [1, 1, 1]], [0, 1]),
    (3, 2, [[0, 0, 0], [1, 1, 1], [1, 1, 1]], [2, 2, 2]),
    (2, 5, [[2, 2, 0], [3, 3, 1]], [2, 3]),
    (3, 5, [[1, 1, 0], [2, 2, 1, 0], [2, 2, 1]], [2, 2, 2])])
def test_ranks_share_the_group_chunk_pairs_and_equal_one_process(tmp_path, world, repeats, drawn, largest):
    """The repeats fold in one group here, so every rank runs every repeat on its contiguous share of the chunks
    and draws only its part of the group's programming (exchanged with the other ranks); the metric's parts are
    gathered and finished in chunk order: per-batch accuracy and whole-dataset Recall@1 / MRR equal one process's,
    read noise included, also when groups of one repeat straddle two ranks' shares. A draw that fails on one rank
    raises on every rank."""
    single = split_data_values(*split_data_task(), repeats)
    assert all(0.0 < value < 1.0 for value in single["recall@1"])  # a value the pairing decides
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_split_data_rank, args=(world, str(tmp_path / "store"), str(tmp_path / "values"), repeats),
             nprocs=world, join=True)
    results = [json.loads((tmp_path / f"values.{rank}").read_text()) for rank in range(world)]
    chunks = [list(range(rank * 7 // world, (rank + 1) * 7 // world)) for rank in range(world)]
    for rank, result in enumerate(results):  # two evaluations, each: all repeats on this rank's chunks
        assert result.pop("shares") == [[[list(range(repeats)), chunks[rank]]]] * 2
        assert result.pop("drawn") == drawn[rank]
        assert result.pop("largest_draw") == largest[rank]
        assert result.pop("probe_forgotten") == single["accuracy"]
        assert result == single
    assert single["methods"] == ["vectorized", "vectorized", "tiles (exact_tiles=True)"]


TINY_MODEL = """
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, {"train": DataLoader(TensorDataset(x, y), batch_size=16)}
"""


def test_torchrun_runs_the_cli_on_every_rank_and_prints_once(tmp_path):
    (tmp_path / "tiny_dist.py").write_text(TINY_MODEL)
    command = ["--quiet", "compile", f"{tmp_path / 'tiny_dist.py'}:build", "--strategy", "hni-only"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", "29613", "-m", "hetcomp", *command, "--out", str(tmp_path / "two")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("compiled Sequential for digital+pcm") == 1  # rank 0 alone prints
    single = subprocess.run([sys.executable, "-m", "hetcomp", *command, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert [layer["assignment"] for layer in two["layers"]] == [layer["assignment"] for layer in one["layers"]]
    for sharded, whole in zip(two["layers"], one["layers"], strict=True):
        assert sharded["metrics"]["hessian_trace"] == pytest.approx(whole["metrics"]["hessian_trace"], rel=1e-5)


def test_the_default_backend_is_nccl_only_with_a_gpu_for_every_local_rank():
    """Every rank of a host must choose alike: with fewer GPUs than local ranks all take gloo (rank 0 alone would
    have found its GPU and taken NCCL, and the others gloo, and hung)."""
    from hetcomp.distributed import default_backend

    assert default_backend(2, 2) == default_backend(1, 8) == "nccl"
    assert default_backend(2, 1) == default_backend(1, 0) == default_backend(4, 3) == "gloo"


def test_shards_deal_every_global_batch_of_one_process_over_the_ranks():
    """Rank r's shard is slice r of the batch one process trains on; the loss weights make the ranks' mean the
    global batch's mean; a last batch smaller than the world goes whole to every rank."""
    data = TrainingData(torch.utils.data.TensorDataset(torch.arange(41.0)[:, None], torch.arange(41) % 3),
                        (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)), batch_size=8)
    single = [x[:, 0].tolist() for x, _ in data.batches(seed=5)]  # 5 batches of 8 and a last one of 1
    assert [len(b) for b in single] == [8, 8, 8, 8, 8, 1]
    assert single == [x[:, 0].tolist() for x, _ in data.epoch_loader(5)]  # the seeded DataLoader's own batches
    assert [[int(i) for i in b] for b in single] == data.epoch_indices(5)
    for world in (2, 3):
        shards = [list(data.shards(5, rank, world)) for rank in range(world)]
        for index, batch in enumerate(single):
            parts = [ranks[index] for ranks in shards]
            if len(batch) < world:  # whole on every rank, trained without averaging
                assert all(p.whole and p.weight == 1.0 and p.inputs[:, 0].tolist() == batch for p in parts)
                continue
            assert [v for p in parts for v in p.inputs[:, 0].tolist()] == batch
            assert max(len(p.labels) for p in parts) - min(len(p.labels) for p in parts) <= 1
            assert all(not p.whole and p.weight == world * len(p.labels) / len(batch) for p in parts)


def test_tensor_shards_are_the_batches_the_dataloader_collates():
    """Tensor data is indexed, not collated sample by sample (and staged on the training device): the same
    values, dtypes and order as the DataLoader path, for a TensorDataset and a Subset of one, on 1 to 5 ranks (5:
    a last batch smaller than the world); a TensorDataset subclass keeps its own __getitem__ (the loader path)."""
    from torch.utils.data import Subset, TensorDataset, default_collate

    class Doubled(TensorDataset):  # an augmentation the fast path must not skip
        def __getitem__(self, index):
            inputs, labels = super().__getitem__(index)
            return 2 * inputs, labels

    values = torch.randn(53, 3, 2, generator=torch.Generator().manual_seed(0))
    base = TensorDataset(values, torch.arange(53) % 4)
    val = (torch.zeros(1, 3, 2), torch.zeros(1, dtype=torch.long))
    assert TrainingData(Doubled(values, torch.arange(53) % 4), val, batch_size=7)._tensors(None) is None
    assert TrainingData(Subset(Doubled(values, torch.arange(53) % 4), [1, 2]), val, batch_size=7)._tensors(None) is None
    staging = torch.device("cpu", 0)  # not equal to the tensors' torch.device("cpu"): the staging branch runs
    for train in (base, Subset(base, list(range(50, 3, -2)))):
        fast = TrainingData(train, val, batch_size=7)
        collated = TrainingData(train, val, batch_size=7, collate_fn=default_collate)  # the per-sample loader path
        assert fast._tensors(None) is not None and collated._tensors(None) is None
        for world in (1, 2, 3, 5):
            for rank in range(world):
                got = list(fast.shards(11, rank, world, staging))
                want = list(collated.shards(11, rank, world))
                assert len(got) == len(want) == -(-len(train) // 7)
                assert want[-1].whole == (world == 5)  # 53 % 7 = 4 and 24 % 7 = 3 samples: whole on 5 ranks
                for a, b in zip(got, want):
                    assert torch.equal(a.inputs, b.inputs) and a.inputs.dtype == b.inputs.dtype
                    assert torch.equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype == torch.long
                    assert (a.weight, a.whole) == (b.weight, b.whole)
        assert len(fast._staged) == 1  # staged once, kept for the next epochs


def _step_log_rank(rank, world, store, root):
    with gloo_group(rank, world, store):
        from hetcomp.errors import CheckpointError
        from hetcomp.storage import StepLog

        tensors = {"w": torch.arange(6.0).reshape(2, 3)}
        shared = StepLog(root / "shared", "k", "LAFT")
        shared.restart()
        shared.append({"step": 0}, tensors)
        shared.append({"step": 1})
        resumed = StepLog(root / "shared", "k", "LAFT")
        assert resumed.resume() == [{"step": 0}, {"step": 1}]  # every rank reads what rank 0 wrote
        assert torch.equal(resumed.latest_tensors(tensors)["w"], tensors["w"])
        local = StepLog(root / f"node-{rank}", "k", "LAFT")  # a folder each rank sees alone
        local.restart()
        local.append({"step": 0}, tensors)
        with pytest.raises(CheckpointError, match=r"ranks \[1\] read other LAFT checkpoints .* every rank sees"):
            StepLog(root / f"node-{rank}", "k", "LAFT").resume()
        dist.barrier()
        if rank == 0:
            (root / "shared" / "k" / "step-00.safetensors").write_bytes(b"replaced")
        dist.barrier()
        with pytest.raises(CheckpointError, match="step-00.safetensors is corrupted"):  # on every rank alike
            StepLog(root / "shared", "k", "LAFT").resume()
        with pytest.raises(ConfigError, match="ranks describe different LAFT runs"):
            StepLog(None, f"key-{rank}", "LAFT")


def test_step_log_under_two_ranks_rank_0_writes_every_rank_reads_and_all_raise_alike(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_step_log_rank, args=(2, str(tmp_path / "store"), tmp_path), nprocs=2, join=True)
    assert not (tmp_path / "node-1").exists()  # rank 1 wrote nothing, not even its own folder
    assert sorted(p.name for p in (tmp_path / "shared" / "k").iterdir()) == ["progress.json", "step-00.safetensors"]


def tiny_task():
    """A tiny MLP (four Linear layers) on a learnable task: 75 training samples (in batches of 16 the last batch,
    11, splits 6 + 5 over two ranks) and 24 validation samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    x, xv, w = torch.randn(75, 6), torch.randn(24, 6), torch.randn(6, 3)
    return model, (x, (x @ w).argmax(1)), (xv, (xv @ w).argmax(1))


def quiet_pcm():
    """PCM without aihwkit's per-sample output noise (``out_noise``); the training weight noise stays on."""
    pcm = get("pcm")
    return TargetSet.of([get("digital"), dataclasses.replace(pcm, name="pcm-quiet",
                                                             device={**pcm.device, "out_noise": 0.0})])


def training(checkpoint_dir, batch_size=16, **settings):
    return hetcomp.LAFT(epochs=1, patience=1, val_repeats=2, val_data=tiny_task()[2], batch_size=batch_size,
                        lr_analog=0.05, lr_digital=0.05, checkpoint_dir=checkpoint_dir, **settings)


def laft_run(checkpoint_dir, quiet=True, batch_size=16, frontend="auto", **settings):
    """A 2-stage LAFT (first-last-digital: the two inner layers on PCM), one epoch a stage. With the torch.export
    front end (``frontend="export"``) the layers are ``aten.linear`` nodes, lowered at their node."""
    model, data, _ = tiny_task()
    return hetcomp.compile(model, quiet_pcm() if quiet else "pcm+digital", data=data, strategy="first-last-digital",
                           hessian={"probes": 2, "max_iter": 3, "batches": 1}, frontend=frontend,
                           finetune=training(checkpoint_dir, batch_size, **settings))


def greedy_run(checkpoint_dir):
    """mac-greedy over the four layers (each candidate a one-epoch stage, then 2 hardware repeats)."""
    model, data, _ = tiny_task()
    return hetcomp.compile(model, quiet_pcm(), data=data, strategy=hetcomp.strategies.mac_greedy(0.3, eval_repeats=2),
                           finetune=training(checkpoint_dir))


def remap_run():
    """H3PIMAP with a user quality function: NSGA-II, then row remap measuring 3 repeats per step."""
    model, data, val = tiny_task()

    def quality(module, data):
        return float((module(data[0]).argmax(-1) == data[1]).float().mean())

    strategy = hetcomp.strategies.pareto(population=8, generations=4, repeats=3, max_steps=3, quality=quality,
                                         val_data=val)
    return hetcomp.compile(model, "pcm+digital", data=data, strategy=strategy,
                           hessian={"probes": 2, "max_iter": 3, "batches": 1})


def summary(laft, noisy, exported, greedy, remap):
    """What the one-process and the data-parallel runs are compared on (weights as lists, records without
    their timings and rank counts)."""
    def weights(compiled):
        return {k: v.tolist() for k, v in compiled.graph.state_dict().items()}

    def records(entries):
        return [{k: v for k, v in entry.items() if k not in ("seconds", "ranks")} for entry in entries]

    return {"laft": weights(laft), "noisy": weights(noisy), "exported": weights(exported), "greedy": weights(greedy),
            "stages": records(laft.manifest.extra["finetune"]["stages"]),
            "ranks": [s.get("ranks", 1) for s in laft.manifest.extra["finetune"]["stages"]],
            "trials": records(greedy.manifest.extra["finetune"]["trials"]),
            "remap": remap.manifest.extra["row_remap"]["trajectory"], "pareto": remap.manifest.extra["pareto"],
            "assignments": [layer["assignment"] for layer in remap.manifest.layers]}


def _training_rank(rank, world, store, out):
    with gloo_group(rank, world, store):
        from hetcomp.storage import checkpoints

        written = []
        real_write = checkpoints.write_atomic

        def recording(path, content):
            written.append(str(Path(path).relative_to(Path(out).parent)))
            return real_write(path, content)

        checkpoints.write_atomic = recording  # in this spawned process only
        result = summary(laft_run(f"{out}.laft"), laft_run(None, quiet=False), laft_run(None, frontend="export"),
                         greedy_run(f"{out}.greedy"), remap_run())
        with pytest.raises(ConfigError, match="smaller than the 2 torch.distributed ranks"):
            laft_run(None, batch_size=1)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({**result, "written": written}, handle)


def test_laft_mac_greedy_and_row_remap_under_two_ranks_equal_one_process_and_rank_0_writes(tmp_path):
    single = summary(laft_run(None), laft_run(None, quiet=False), laft_run(None, frontend="export"), greedy_run(None),
                     remap_run())
    assert [s["best_epoch"] for s in single["stages"]] == [1, 1]  # both stages trained, and kept, new weights
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_training_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "run")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"run.{rank}").read_text()) for rank in range(2)]
    # Every rank ends with the same weights, also with aihwkit's per-sample output noise on ("noisy").
    assert {k: v for k, v in ranks[1].items() if k != "written"} == {k: v for k, v in ranks[0].items()
                                                                      if k != "written"}
    # Weight-noise injection on, output noise off: one process's weights, up to float reduction order. The
    # torch.export graph keeps the digital weights its lowered nodes replaced, unread: DDP must leave them out.
    for run in ("laft", "exported", "greedy"):
        for name, value in single[run].items():
            torch.testing.assert_close(torch.tensor(ranks[0][run][name]), torch.tensor(value), rtol=1e-5, atol=1e-6)
    assert ranks[0]["stages"] == single["stages"] and ranks[0]["ranks"] == [2, 2]
    assert ranks[0]["trials"] == single["trials"]  # mac-greedy: the same verdicts from the sharded evaluation
    # NSGA-II on rank 0, broadcast; row remap's quality repeats split over the ranks: one process's trajectory.
    for key in ("remap", "pareto", "assignments"):
        assert ranks[0][key] == single[key], key
    # Rank 0 alone wrote the checkpoints: each step's tensors and the progress file listing them.
    assert ranks[1]["written"] == []
    files = {str(p.relative_to(tmp_path)) for run in ("laft", "greedy") for p in (tmp_path / f"run.{run}").rglob("*")
             if p.is_file()}
    assert set(ranks[0]["written"]) == files
    (laft_folder,) = (tmp_path / "run.laft").iterdir()
    assert sorted(p.name for p in laft_folder.iterdir()) == ["progress.json", "step-00.safetensors",
                                                             "step-01.safetensors"]


KILLED_LAFT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
import hetcomp.distributed
from hetcomp.finetune import laft
from hetcomp.finetune.data import TrainingData
from hetcomp.progress import set_quiet
from test_distributed import laft_run

set_quiet(True)
torch.set_num_threads(1)
hetcomp.distributed.init()
rank = hetcomp.distributed.rank()
real_stage, real_shards, calls = laft.train_stage, TrainingData.shards, []


def train_stage(*args, **kwargs):
    calls.append(kwargs["desc"])
    return real_stage(*args, **kwargs)


def shards(self, *args, **kwargs):
    for index, shard in enumerate(real_shards(self, *args, **kwargs)):
        if os.environ.get("KILL_IN_STAGE") == str(len(calls)) and rank == 1 and index == 2:
            os._exit(9)  # killed in the middle of a stage, after two data-parallel steps: no clean-up
        yield shard


laft.train_stage, TrainingData.shards = train_stage, shards
compiled = laft_run({checkpoints!r})
if rank == 0:
    json.dump({{"calls": calls, "weights": {{k: v.tolist() for k, v in compiled.graph.state_dict().items()}}}},
              open({out!r}, "w"))
hetcomp.distributed.shutdown()
"""


def test_laft_killed_under_torchrun_resumes_to_the_uninterrupted_result(tmp_path):
    uninterrupted = laft_run(None)
    script = tmp_path / "killed_laft.py"
    script.write_text(KILLED_LAFT.format(tests=str(Path(__file__).parent), checkpoints=str(tmp_path / "ckpt"),
                                         out=str(tmp_path / "resumed.json")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_IN_STAGE": "2"}
    killed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "resumed.json").exists()
    assert re.search(r"exitcode\s*:\s*9\b", killed.stderr), killed.stderr[-3000:]  # rank 1's kill, no other error
    (folder,) = (tmp_path / "ckpt").iterdir()
    assert len(json.loads((folder / "progress.json").read_text())["steps"]) == 1  # stage 1 finished, stage 2 not
    del env["KILL_IN_STAGE"]
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert len(result["calls"]) == 1 and result["calls"][0].startswith("LAFT stage 2/2")  # only the stage left
    for name, value in uninterrupted.graph.state_dict().items():
        torch.testing.assert_close(torch.tensor(result["weights"][name]), value, rtol=1e-5, atol=1e-6)


def bn_task():
    """A tiny conv net with BatchNorm after each convolution, on a learnable task (noisy stripes of three
    orientations): 75 training samples (the last
    batch of 16, 11 samples, splits 6 + 5 over two ranks: loss weights 12/11 and 10/11) and 24 validation ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    rows = torch.arange(6.0)
    patterns = torch.stack([torch.cos(rows)[:, None].expand(6, 6), torch.cos(rows)[None, :].expand(6, 6),
                            torch.cos(rows[:, None] + rows[None, :])])  # horizontal, vertical, diagonal stripes

    def samples(n):
        labels = torch.randint(0, 3, (n,))
        return patterns[labels][:, None] + 0.7 * torch.randn(n, 1, 6, 6), labels

    return model, samples(75), samples(24)


def continuous_pcm():
    """PCM whose simulated forward is continuous in its inputs: no output noise (drawn per sample), no DAC/ADC
    quantization and no output bound (aihwkit's iterative bound management halves a tile's inputs for the whole
    batch when any output clips: with it a rank's slice may take another branch than the global batch, and a
    rounding-level difference can flip a quantization level or that branch). The training weight noise stays on."""
    pcm = get("pcm")
    return TargetSet.of([get("digital"), dataclasses.replace(
        pcm, name="pcm-continuous", device={**pcm.device, "out_noise": 0.0, "out_bound": 0.0},
        precision=dataclasses.replace(pcm.precision, input_bits=None, output_bits=None))])


def bn_laft_run():
    """LAFT (first-last-digital: the two inner convolutions on PCM, two stages) of ``bn_task``; the weights."""
    model, data, val = bn_task()
    compiled = hetcomp.compile(model, continuous_pcm(), data=data, strategy="first-last-digital",
                               hessian={"probes": 2, "max_iter": 3, "batches": 1},
                               finetune=hetcomp.LAFT(epochs=1, patience=1, val_repeats=2, val_data=val, batch_size=16,
                                                     lr_analog=0.05, lr_digital=0.05, checkpoint_dir=None))
    return {"weights": {k: v.tolist() for k, v in compiled.graph.state_dict().items()},
            "stages": [{k: v for k, v in s.items() if k not in ("seconds", "ranks")}
                       for s in compiled.manifest.extra["finetune"]["stages"]]}


def _bn_training_rank(rank, world, store, out):
    with gloo_group(rank, world, store):
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(bn_laft_run(), handle)


def test_sync_batchnorm_setting_picks_global_or_per_rank_statistics():
    """LAFT(sync_batchnorm=...) reaches the data-parallel stage: BatchNorm becomes GlobalBatchNorm (on any device: it
    picks its kernels per input) unless it is False; the setting enters the run's key only when off."""
    from hetcomp.finetune import stage
    from hetcomp.finetune.laft import LAFT

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(4)))

    def kinds(module: nn.Module) -> list[str]:
        return [type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__]

    assert kinds(stage._batchnorm(model(), True)) == ["GlobalBatchNorm", "GlobalBatchNorm"]
    assert kinds(stage._batchnorm(model(), False)) == ["BatchNorm2d", "BatchNorm1d"]
    assert LAFT().stage_settings().sync_batchnorm is True
    off = LAFT(sync_batchnorm=False)
    assert off.stage_settings().sync_batchnorm is False
    assert "sync_batchnorm" not in LAFT().settings() and off.settings()["sync_batchnorm"] is False
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        LAFT(sync_batchnorm="no")


def test_laft_of_a_batchnorm_model_under_two_ranks_with_global_batch_statistics_equals_one_process(tmp_path):
    """With BatchNorm normalizing by the global batch (GlobalBatchNorm, which the stage itself puts in) and a continuous
    analog forward, the data-parallel stages (shards, loss weights of an uneven last batch, DDP's averaging, the
    BatchNorm gradient summed over the ranks, running statistics, rank 0's buffers) give one process's weights."""
    single = bn_laft_run()
    assert [s["best_epoch"] for s in single["stages"]] == [1, 1]  # both stages trained, and kept, new weights
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_bn_training_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "run")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"run.{rank}").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["stages"] == single["stages"]
    for name, value in single["weights"].items():
        torch.testing.assert_close(torch.tensor(ranks[0]["weights"][name]), torch.tensor(value), rtol=1e-5, atol=1e-6)


def _global_bn_case(bn_class, shape):
    """A BatchNorm layer, a global batch and the output gradient of a test case (seeded: every rank builds the same)."""
    torch.manual_seed(0)
    bn = bn_class(shape[1], momentum=None if bn_class is nn.BatchNorm1d else 0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn, torch.randn(*shape) * 3 + 1, torch.randn(*shape)


def _global_bn_rank(rank, world, store, out):
    with gloo_group(rank, world, store):
        from hetcomp.finetune.global_batchnorm import GlobalBatchNorm

        results = {}
        for bn_class, shape in ((nn.BatchNorm1d, (8, 4)), (nn.BatchNorm2d, (8, 3, 4, 4))):
            bn, x, grad = _global_bn_case(bn_class, shape)
            bn = GlobalBatchNorm.convert(bn).train()
            rows = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven slices of the global batch
            inputs = x[rows].clone().requires_grad_()
            outputs = bn(inputs)
            (outputs * grad[rows]).sum().backward()
            for tensor in (bn.weight.grad, bn.bias.grad):
                dist.all_reduce(tensor)  # the ranks' parameter gradients summed: the global loss's
            results[bn_class.__name__] = {
                "out": outputs.tolist(), "input_grad": inputs.grad.tolist(), "weight_grad": bn.weight.grad.tolist(),
                "bias_grad": bn.bias.grad.tolist(), "running_mean": bn.running_mean.tolist(),
                "running_var": bn.running_var.tolist()}
        with pytest.raises(DataError, match="empty slice"):  # raised on the host before any collective
            GlobalBatchNorm.convert(nn.BatchNorm1d(4)).train()(torch.empty(0, 4))
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(results, handle)


def test_global_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    """GlobalBatchNorm on uneven slices (3 + 5 samples) of a batch gives one BatchNorm's outputs, input and parameter
    gradients and running statistics on the whole batch (1-d with a cumulative average, 2-d with momentum): the
    collectives and the merge of the ranks' statistics, through the composite kernels the CPU uses (CUDA uses torch's,
    checked against these by bench/check_batchnorm_kernels.py). An empty slice is refused before any collective."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_global_bn_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "bn")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"bn.{rank}").read_text()) for rank in range(2)]
    for bn_class, shape in ((nn.BatchNorm1d, (8, 4)), (nn.BatchNorm2d, (8, 3, 4, 4))):
        bn, x, grad = _global_bn_case(bn_class, shape)
        inputs = x.clone().requires_grad_()
        outputs = bn.train()(inputs)
        (outputs * grad).sum().backward()
        got = [rank[bn_class.__name__] for rank in ranks]
        torch.testing.assert_close(torch.cat([torch.tensor(r["out"]) for r in got]), outputs.detach(),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([torch.tensor(r["input_grad"]) for r in got]), inputs.grad,
                                   rtol=1e-4, atol=1e-5)
        for rank in got:
            for name, expected in (("weight_grad", bn.weight.grad), ("bias_grad", bn.bias.grad),
                                   ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
                torch.testing.assert_close(torch.tensor(rank[name]), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_composite_batchnorm_kernels_keep_a_low_precision_inputs_statistics_in_float32():
    """For a bfloat16 input the CPU's composite kernels return the statistics and the backward's sums in float32 (as
    torch's CUDA kernels accumulate a half input's), the count survives the merge exactly (257 is not a bfloat16),
    and the output and input gradient keep the input's dtype and channels-last layout."""
    from hetcomp.finetune.global_batchnorm import _CompositeKernels, _dense

    torch.manual_seed(0)
    x = (torch.randn(257, 3, 1, 1) * 2 + 5).to(torch.bfloat16)
    mean, invstd = _CompositeKernels.batch_norm_stats(x, 1e-5)
    wide = x.double().flatten(1)
    assert mean.dtype == invstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), wide.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double(), (wide.var(0, unbiased=False) + 1e-5).rsqrt(), rtol=1e-6, atol=1e-6)
    counts = torch.tensor([257.0, 257.0])
    merged_mean, merged_invstd = _CompositeKernels.batch_norm_gather_stats_with_counts(
        x, torch.stack([mean, mean]), torch.stack([invstd, invstd]), None, None, 0.1, 1e-5, counts)
    torch.testing.assert_close(merged_mean, mean)
    torch.testing.assert_close(merged_invstd, invstd)
    dy = torch.randn(257, 3, 1, 1).to(torch.bfloat16)
    sum_dy, sum_dy_xmu, _, _ = _CompositeKernels.batch_norm_backward_reduce(dy, x, mean, invstd, None, True, False,
                                                                            False)
    assert sum_dy.dtype == sum_dy_xmu.dtype == torch.float32
    assert _CompositeKernels.batch_norm_elemt(x, None, None, mean, invstd, 1e-5).dtype == torch.bfloat16
    last = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    assert _dense(last) is last and _dense(last.transpose(2, 3)).is_contiguous()


def _batched_fallback_rank(rank, world, store, out):
    import datetime

    with gloo_group(rank, world, store, timeout=datetime.timedelta(seconds=120)):  # a mismatch fails, not hangs
        from hetcomp.analysis.hessian import HessianOperator

        real_grad = torch.autograd.grad

        def no_batching_rule(*args, **kwargs):  # an op without a vmap rule, met only where a gradient graph exists
            if kwargs.get("is_grads_batched"):
                raise RuntimeError("Batching rule not implemented")
            return real_grad(*args, **kwargs)

        torch.autograd.grad = no_batching_rule
        model, batches = model_and_data()
        params = [model[0].weight, model[2].weight]
        operator = HessianOperator(model, params, batches[:1], nn.functional.cross_entropy, batched=True,
                                   process_group=dist.group.WORLD)  # one batch: rank 1 holds no gradient graph
        vectors = [torch.ones(3, *p.shape) * torch.arange(1.0, 4.0).view(3, *[1] * p.dim()) for p in params]
        first = operator.hvp_many(vectors)
        batched_after_first = operator.batched
        second = operator.hvp_many(vectors)  # both ranks must take the looped path now: the same collectives
        block = operator.block_hvp({1: vectors[1]})[1]
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"first": [t.tolist() for t in first], "second": [t.tolist() for t in second],
                       "block": block.tolist(), "batched": [batched_after_first, operator.batched]}, handle)


def test_ranks_agree_to_stop_batching_probes_when_one_meets_an_op_without_a_batching_rule(tmp_path):
    """With more ranks than calibration batches, only the ranks holding a gradient graph meet an op without a vmap
    rule; they vote with the others in the next all-reduce, so every rank leaves the batched path together and
    later products issue the same collectives everywhere (and equal one process's looped products)."""
    from hetcomp.analysis.hessian import HessianOperator

    model, batches = model_and_data()
    params = [model[0].weight, model[2].weight]
    operator = HessianOperator(model, params, batches[:1], nn.functional.cross_entropy, batched=False)
    vectors = [torch.ones(3, *p.shape) * torch.arange(1.0, 4.0).view(3, *[1] * p.dim()) for p in params]
    expected = operator.hvp_many(vectors)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_batched_fallback_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "fallback")), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"fallback.{rank}").read_text()) for rank in range(2)]
    for result in ranks:
        assert result["batched"] == [False, False]  # rank 1 (no graph) learned it from rank 0's vote
        for key in ("first", "second"):
            for got, want in zip(result[key], expected):
                torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(result["block"]), operator.block_hvp({1: vectors[1]})[1],
                                   rtol=1e-5, atol=1e-7)


def contrastive_task():
    """11 query-document pairs of 3 'tokens' with 6 features each, embedded by one Linear layer (the tokens'
    mean, as sentence encoders pool): a global batch that splits 6 + 5 over two ranks."""
    torch.manual_seed(0)
    queries = torch.randn(11, 3, 6)
    return nn.Linear(6, 8), queries, queries + 0.5 * torch.randn(11, 3, 6)


def info_nce_gradient(model, queries, documents, sizes=None, rank=0, sliced=True):
    """The gradient of the weights under MiniLM's InfoNCE on one batch of pairs (the PairCollator's layout:
    queries, then their documents); with ``sizes``, on this rank's slice, weighted as the stage weights it
    (``N x slice / batch``), under DDP."""
    from torch.nn.parallel import DistributedDataParallel

    from hetcomp.zoo.docstrings import info_nce

    if sizes is not None:
        start = sum(sizes[:rank])
        queries, documents = queries[start : start + sizes[rank]], documents[start : start + sizes[rank]]
        model = DistributedDataParallel(model)
    inputs = torch.cat([queries, documents])
    batch = {"attention_mask": torch.ones(inputs.shape[:2])}
    with hetcomp.distributed.sliced_batch(sliced):
        loss = info_nce(model(inputs), batch)
    weight = 1.0 if sizes is None else len(sizes) * sizes[rank] / sum(sizes)
    (loss * weight).backward()
    module = model.module if sizes is not None else model
    return torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()])


def _contrastive_rank(rank, world, store, out):
    with gloo_group(rank, world, store):
        from hetcomp.distributed import gather_batch

        rows = torch.arange(3.0 + rank).unsqueeze(1)  # rank 0 holds 3 rows, rank 1 holds 4
        with hetcomp.distributed.sliced_batch():
            gathered, start = gather_batch(rows)
        assert gathered.squeeze(1).tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0] and start == [0, 3][rank]
        assert gather_batch(rows)[0] is rows  # outside a sliced step: the rows as they are
        with hetcomp.distributed.sliced_batch(False):  # a batch every rank holds whole
            assert gather_batch(rows) == (rows, 0)
        model, queries, documents = contrastive_task()
        gathered = info_nce_gradient(model, queries, documents, [6, 5], rank)
        model, queries, documents = contrastive_task()
        local = info_nce_gradient(model, queries, documents, [6, 5], rank, sliced=False)
        torch.save({"gathered": gathered, "local": local}, f"{out}.{rank}")


def test_an_in_batch_loss_sees_the_global_batch_in_a_data_parallel_step(tmp_path):
    """MiniLM's InfoNCE scores each query against every document of the batch. Under DDP each rank holds a slice
    (6 + 5 pairs); with the documents gathered over the ranks (``gather_batch``, with autograd) the averaged
    gradient is one process's on the whole batch; with each slice's own documents as negatives it is not."""
    single = info_nce_gradient(*contrastive_task())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_contrastive_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "grad")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"grad.{rank}", weights_only=True) for rank in range(2)]
    for result in ranks:  # DDP's averaged gradient, the same on both ranks
        torch.testing.assert_close(result["gathered"], single, rtol=1e-4, atol=1e-6)  # measured 2e-7
    assert (ranks[0]["local"] - single).abs().max() > 1e-2  # slice-local negatives: another gradient


class Pair(NamedTuple):
    rows: torch.Tensor
    rank: int


def _exchange_rank(rank, world, store, out):
    from hetcomp import distributed

    with gloo_group(rank, world, store):
        # all_gather_tree: each rank's structure of mixed dtypes (odd byte counts before wider dtypes, an empty and
        # a non-contiguous tensor, plain leaves), sizes differing per rank.
        own = {"flags": torch.arange(rank + 3) % 2 == 0, "values": (torch.arange(4.0, dtype=torch.float64) + rank,
                                                                     torch.empty(0, rank + 1)),
               "columns": torch.arange(12, dtype=torch.int32).view(3, 4).t()[:, rank:], "name": f"rank {rank}",
               "count": rank, "half": torch.tensor(rank + 0.5, dtype=torch.bfloat16),
               "conjugate": torch.tensor([1 + 2j, rank - 1j]).conj(), "pair": Pair(torch.ones(rank + 1), rank)}
        gathered = distributed.all_gather_tree(own)
        # share_rows: ranks 0 and 1, then ranks 1 and 2 (overlapping groups, made by every rank, each once) share rows
        # (2 and 1 of them), the third rank taking no part; then all three (the default group), one empty, mixed
        # dtypes (float16 rows of 6 bytes before int64 ones: each starts aligned).
        with pytest.raises(ConfigError, match="make_peer_groups"):
            distributed.share_rows([torch.zeros(1)], [1, 1], [0, 2]) if rank != 1 else distributed._peer_group([0, 2])
        made, real_new_group = [], dist.new_group

        def new_group(ranks, *args, **kwargs):
            made.append(list(ranks))
            return real_new_group(ranks, *args, **kwargs)

        dist.new_group = new_group  # in this spawned process only
        distributed.make_peer_groups([[0, 1], [1, 2], [0, 1, 2]])
        distributed.make_peer_groups([[1, 2]])
        dist.new_group = real_new_group
        pairs = {}
        for peers in ([0, 1], [1, 2]):
            if rank in peers:
                pairs[str(peers)] = distributed.share_rows(
                    [torch.full((2 if rank == peers[0] else 1, 3), float(rank))], [2, 1], peers)
        counts = [1, 0, 2]
        trio = distributed.share_rows([torch.full((counts[rank], 3), float(rank), dtype=torch.float16),
                                       torch.arange(counts[rank], dtype=torch.int64) + 10 * rank], counts, [0, 1, 2])
        groups = made
        with pytest.raises(ConfigError, match="ascending"):
            distributed.make_peer_groups([[2, 1]])
        torch.save({"gathered": gathered, "pairs": pairs, "trio": trio, "groups": groups}, f"{out}.{rank}")


def test_all_gather_tree_and_share_rows_under_three_ranks(tmp_path):
    """The evaluator's two exchanges: every rank's structure with its tensors through one flat buffer
    (all_gather_tree), and rows split over some or all of the ranks, by an all-gather over their group (share_rows)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_exchange_rank, args=(3, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=3, join=True)
    expected_trio = [torch.tensor([[0.0] * 3, [2.0] * 3, [2.0] * 3], dtype=torch.float16), torch.tensor([0, 20, 21])]
    for rank in range(3):
        result = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        for other, got in enumerate(result["gathered"]):
            assert got["name"] == f"rank {other}" and got["count"] == other
            assert torch.equal(got["flags"], torch.arange(other + 3) % 2 == 0)
            assert torch.equal(got["values"][0], torch.arange(4.0, dtype=torch.float64) + other)
            assert got["values"][1].shape == (0, other + 1)
            assert torch.equal(got["columns"], torch.arange(12, dtype=torch.int32).view(3, 4).t()[:, other:])
            assert got["half"].dtype == torch.bfloat16 and got["half"].dim() == 0 and float(got["half"]) == other + 0.5
            assert torch.equal(got["conjugate"], torch.tensor([1 - 2j, other + 1j]))
            assert isinstance(got["pair"], Pair) and torch.equal(got["pair"].rows, torch.ones(other + 1))
        for peers in ([0, 1], [1, 2]):
            if rank in peers:
                (pair,) = result["pairs"][str(peers)]
                assert torch.equal(pair, torch.tensor([[float(peers[0])] * 3] * 2 + [[float(peers[1])] * 3]))
        assert result["groups"] == [[0, 1], [1, 2]]  # made once each, by every rank; all three: the default group
        for got, expected in zip(result["trio"], expected_trio, strict=True):
            assert torch.equal(got, expected)
