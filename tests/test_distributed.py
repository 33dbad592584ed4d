"""torch.distributed (gloo, 2 and 3 processes on CPU): the Hessian passes shard their calibration batches over the
ranks and all-reduce every HVP, evaluation splits its hardware repeats; both give what one process gives."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import hetcomp

SETTINGS = {"probes": 4, "max_iter": 6, "batches": 4}


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
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


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
    import subprocess
    import sys

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
