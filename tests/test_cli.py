"""The hetcomp command line on the digits example: exit codes, files written, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import onnx

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
    assert manifest["layers"][1]["metrics"]["hni"] > 0
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    for png in ("assignment.png", "hni_scr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (out / png).unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv2" in printed and "first_last_digital: inner layer to analog" in printed
    assert (out / "assignment.png").exists() and (out / "hni_scr.png").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hetcomp.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = run_cli("compile", "no/such/file.py:build", "--out", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "hetcomp: error: model file 'no/such/file.py' not found (run with --debug for the traceback)"]
    bad_target = run_cli("compile", EXAMPLE, "--target", "pcm+tpu", "--out", str(tmp_path))
    assert bad_target.returncode == 2
    lines = bad_target.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown target(s) 'tpu'" in lines[0] and "Traceback" not in bad_target.stderr
    no_manifest = run_cli("report", str(tmp_path / "empty"))
    assert no_manifest.returncode == 2 and "no manifest at" in no_manifest.stderr
    debug = run_cli("--debug", "compile", "no/such/file.py:build", "--out", str(tmp_path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compile_with_laft_and_evaluation(tmp_path, capsys, digits_model):
    out = tmp_path / "laft"
    assert main(["--quiet", "compile", EXAMPLE, "--laft", "--laft-epochs", "1", "--laft-checkpoints",
                 str(tmp_path / "checkpoints"), "--evaluate", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == "hilal" and manifest["extra"]["finetune"]["complete"]
    assert "test: accuracy" in printed and "over 2 repeats" in printed
    assert list((tmp_path / "checkpoints").iterdir())  # one run folder with its stage checkpoints
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
