"""The hetcomp command line on the digits example: exit codes, files written, one-line errors."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from hetcomp.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "digits_cnn.py") + ":build"


def test_targets_lists_every_target(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("digital", "pcm", "sram", "reram", "photonic"):
        assert f"\n{name} " in out


def test_compile_then_report(tmp_path, capsys, digits_model):
    out = tmp_path / "run"
    assert main(["--quiet", "compile", EXAMPLE, "--target", "pcm+digital", "--strategy", "first-last-digital",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "first-last-digital" and len(manifest["layers"]) == 6
    conv2 = manifest["layers"][1]["metrics"]
    # > 0 on any trained weights: the default estimator probes each layer's Hessian block on its own, and the
    # block is positive semi-definite (the CNN is piecewise linear in each weight), so every v'Hv >= 0
    assert conv2["hessian_trace"] > 0 and conv2["hni"] > 0
    weight = digits_model[0].conv2.weight.detach()  # the same cached weights the CLI's build() loads
    sigma = 0.08 * float(weight.abs().max())  # HILAL Def. 1 with the default gamma
    assert conv2["hni"] == pytest.approx(sigma**2 / (2 * weight.numel()) * conv2["hessian_trace"], rel=1e-6)
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    for png in ("assignment.png", "hni_scr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (out / png).unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "first_last_digital: inner layer to analog" in printed
    assert "estimated per sample: latency" in printed and "pcm " in printed.split("busy time / energy")[1]
    assert (out / "assignment.png").exists() and (out / "hni_scr.png").exists()


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hetcomp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


TINY = """
import torch
import torch.nn as nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def loaders():
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return {"train": loader, "test": loader}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_python_dash_m_hetcomp_runs_the_cli():
    listed = run_cli("targets")
    assert listed.returncode == 0 and "\npcm " in listed.stdout and not listed.stderr


def test_model_file_neighbours_never_shadow_installed_packages(tmp_path):
    project = tmp_path / "project"
    marker = tmp_path / "SHADOWED"
    for name in ("onnx", "onnxscript", "onnx_ir"):  # what export imports; none may run from the model's folder
        write(project / f"{name}.py", f"import pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n"
                                      f"raise ImportError('neighbour {name}.py imported')\n")
    write(project / "shadow_helpers.py", TINY)
    model = write(project / "shadow_model.py", "import onnx  # the installed package, not the neighbour onnx.py\n"
                  "from shadow_helpers import tiny  # the model's own neighbour\n\n\ndef build():\n"
                  "    return tiny()\n")
    out = tmp_path / "out"
    result = run_cli("--quiet", "compile", f"{model}:build", "--input-shape", "2,4", "--strategy",
                     "first-last-digital", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert json.loads((out / "manifest.json").read_text())["strategy"] == "first-last-digital"
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


def test_no_hessian_still_uses_the_data(tmp_path, capsys):
    write(tmp_path / "nohess_helpers.py", TINY)
    model = write(tmp_path / "nohess_model.py", "from nohess_helpers import loaders, tiny\n\n\ndef build():\n"
                  "    return tiny(), loaders()\n")
    path_before = list(sys.path)
    out = tmp_path / "out"
    assert main(["--quiet", "compile", f"{model}:build", "--strategy", "first-last-digital", "--no-hessian",
                 "--evaluate", "1", "--out", str(out)]) == 0  # traced with the first batch, evaluated on 'test'
    assert sys.path == path_before  # the model's folder was only on sys.path while it loaded
    printed = capsys.readouterr().out
    assert "test: accuracy" in printed and "over 1 repeats" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["layers"]) == 3 and all("hni" not in layer["metrics"] for layer in manifest["layers"])
    assert main(["compile", f"{model}:build", "--no-hessian", "--laft", "--strategy", "first-last-digital",
                 "--out", str(tmp_path / "laft")]) == 2
    assert "--laft needs the data and its Hessian analysis" in capsys.readouterr().err
    assert main(["compile", f"{model}:build", "--no-hessian", "--out", str(tmp_path / "hilal")]) == 2
    err = capsys.readouterr().err
    assert "strategy 'hilal' needs data" in err and "--no-hessian" in err
    assert not (tmp_path / "laft").exists() and not (tmp_path / "hilal").exists()


def test_every_user_error_is_one_line_exit_2(tmp_path, capsys):
    no_data = write(tmp_path / "no_data.py", TINY + "\n\ndef build():\n    return tiny()\n")
    exits = write(tmp_path / "exits.py", "def build():\n    raise SystemExit(0)\n")
    exits_on_import = write(tmp_path / "exits_on_import.py", "import sys\n\nsys.exit('bye')\n")
    raises = write(tmp_path / "raises.py", "def build():\n    raise RuntimeError('no GPU\\nsecond line')\n")
    manifests = {"missing_keys": '{"schema_version": 1}', "a_list": "[]",
                 "wrong_types": json.dumps({"schema_version": 1, "model": {}, "target_set": "pcm+digital",
                                            "targets": [], "strategy": "s", "seed": 0, "layers": [1],
                                            "summary": {}})}
    for name, text in manifests.items():
        write(tmp_path / name / "manifest.json", text)
    out = tmp_path / "out"
    cases = [
        (["compile", EXAMPLE, "--target", "pcm+tpu", "--out", str(out)], "unknown target(s) 'tpu'"),
        (["compile", EXAMPLE, "--strategy", "nonsense", "--out", str(out)], "unknown strategy 'nonsense'"),
        (["compile", f"{no_data}:build", "--input-shape", "1,x", "--out", str(out)], "malformed shape '1,x'"),
        (["compile", f"{no_data}:build", "--strategy", "all-digital", "--out", str(out)], "no data to trace with"),
        (["compile", f"{no_data}:build", "--out", str(out)], "strategy 'hilal' needs data"),
        (["compile", f"{no_data}:build", "--strategy", "all-digital", "--evaluate", "1", "--input-shape", "1,4",
          "--out", str(out)], "--evaluate needs a 'test' loader"),
        (["compile", "no/such/file.py:build", "--out", str(out)], "model file 'no/such/file.py' not found"),
        (["compile", str(no_data), "--out", str(out)], "MODEL must be 'path/to/file.py:function'"),
        (["compile", f"{no_data}:nope", "--out", str(out)], "has no function 'nope'"),
        (["compile", f"{exits}:build", "--input-shape", "2,4", "--out", str(out)], "raised SystemExit(0)"),
        (["compile", f"{exits_on_import}:build", "--out", str(out)], "raised SystemExit('bye')"),
        (["compile", f"{raises}:build", "--out", str(out)], "raised RuntimeError: no GPU"),
        (["compile", f"{no_data}:build"], "the following arguments are required: --out"),
        (["report", str(tmp_path / "empty")], "no manifest at"),
        *[(["report", str(tmp_path / name)], "manifest") for name in manifests],
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:  # each case is a fresh process: mostly import time
        results = list(pool.map(lambda case: run_cli(*case[0]), cases))
    for (args, expected), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("hetcomp: error: "), (args, result.stderr)
        assert expected in lines[0] and "Traceback" not in result.stderr, (args, lines)
    assert not out.exists()  # no case wrote anything
    capsys.readouterr()
    for args, expected in [(["--input-shape", "0,4"], "malformed shape '0,4'"), (["--seed", "x"], "argument --seed"),
                           ([], "required: --out")]:  # argument errors return 2 in-process too
        assert main(["compile", f"{no_data}:build", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hetcomp: error: ") and expected in lines[0], lines


def test_debug_prints_the_traceback_and_exits_2(tmp_path):
    exits = write(tmp_path / "exits.py", "def build():\n    raise SystemExit(0)\n")
    for args in (["compile", "no/such/file.py:build"], ["compile", f"{exits}:build", "--input-shape", "2,4"]):
        result = run_cli("--debug", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and "Traceback" in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("hetcomp: error: ")
    assert "SystemExit: 0" in result.stderr and "raised SystemExit(0)" in result.stderr


def test_compile_with_laft_and_evaluation(tmp_path, capsys, digits_model):
    out = tmp_path / "laft"
    assert main(["--quiet", "compile", EXAMPLE, "--laft", "--laft-epochs", "1", "--laft-checkpoints",
                 str(tmp_path / "checkpoints"), "--evaluate", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "hilal" and manifest["extra"]["finetune"]["complete"]
    assert "test: accuracy" in printed and "over 2 repeats" in printed
    assert list((tmp_path / "checkpoints").iterdir())  # one run folder with its stage checkpoints
    # The saved folder, loaded through hetcomp.load, evaluates to what the compile printed (same seed).
    assert main(["--quiet", "evaluate", str(out), EXAMPLE, "--repeats", "2"]) == 0
    again = capsys.readouterr().out
    accuracy = lambda text: text.split("test: ")[1].split(";")[0]  # noqa: E731
    assert accuracy(again) == accuracy(printed)
    assert main(["compile", EXAMPLE, "--evaluate", "2", "--input-shape", "1,1,8,8", "--data",
                 "nonexistent.py:f", "--out", str(out)]) == 2


def test_compile_multitier_writes_front_and_row_split_onnx(tmp_path, capsys):
    source = tmp_path / "tiny.py"
    source.write_text("from hetcomp.zoo import DigitsTransformer\n\ndef build():\n    return DigitsTransformer()\n")
    out = tmp_path / "mt"
    assert main(["--quiet", "compile", f"{source}:build", "--target", "sram+reram+photonic", "--strategy",
                 "pareto-po", "--input-shape", "4,1,8,8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front: " in printed and " ns, energy " in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "pareto-po" and manifest["extra"]["pareto"]["front"]
    assert (out / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    split = [json.loads(p.value) for node in model.graph.node for p in node.metadata_props if p.key == "hetcomp.rows"]
    assert split and all(sum(rows.values()) > 0 for rows in split)


def test_laft_trains_on_the_train_loader_not_the_calibration_subset():
    from hetcomp.cli import _calibration

    data = {"train": "all training batches", "calibration": "a few batches"}
    assert _calibration(data) == "a few batches"  # the Hessian passes need only a few
    assert _calibration(data, training=True) == "all training batches"  # what LAFT trains on


def test_a_folder_report_added_plots_to_is_still_replaced_by_the_next_save(tmp_path, capsys):
    import torch

    import hetcomp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    compiled = hetcomp.compile(model, "pcm+digital", (torch.randn(2, 4),), strategy="first-last-digital")
    out = compiled.save(tmp_path / "out", onnx=False)  # no plots in the folder
    assert main(["report", str(out)]) == 0 and (out / "assignment.png").exists()
    compiled.save(out, onnx=False)  # the report's plots are hetcomp's output: replaced, not refused
    assert not (out / "assignment.png").exists()
