"""The top-level Python API: `import augment_gan as ag; ag.fit(...); ag.synth(...); ag.evaluate(...)`."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import augment_gan

pytest_plugins = ["fixtures_run"]  # digits100

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("fit", "synth", "vary", "evaluate", "merge", "report", "inspect")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_every_command_is_a_function_whatever_was_imported_first(tmp_path):
    # Importing a submodule binds it to the package attribute of the same name; the API names must win,
    # in a fresh interpreter, before and after the submodules are imported.
    res = _run("""
        import types
        import augment_gan.synth, augment_gan.vary, augment_gan.evaluate, augment_gan.merge, augment_gan.report
        import augment_gan.train, augment_gan.data
        import augment_gan as ag
        from augment_gan.synth import SynthConfig            # submodules stay importable
        for name in ("fit", "synth", "vary", "evaluate", "merge", "report", "inspect"):
            obj = getattr(ag, name)
            assert isinstance(obj, types.FunctionType), (name, obj)
        assert ag.SynthConfig is SynthConfig
        import augment_gan.synth
        assert isinstance(ag.synth, types.FunctionType)
        print("ok")
    """, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_importing_the_package_stays_light(tmp_path):
    res = _run("""
        import sys, augment_gan
        print(json.dumps(sorted(m for m in ("torch", "albumentations") if m in sys.modules)))
    """.replace("import sys", "import json, sys"), tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr


def test_the_cli_calls_the_api_functions():
    from augment_gan.data import inspect_folder
    from augment_gan.merge import merge_folders
    from augment_gan.report import write_report
    from augment_gan.synth import synth
    from augment_gan.train import fit
    from augment_gan.vary import vary

    assert (augment_gan.fit, augment_gan.synth, augment_gan.vary, augment_gan.merge, augment_gan.report,
            augment_gan.inspect) == (fit, synth, vary, merge_folders, write_report, inspect_folder)
    assert set(COMMANDS) <= set(augment_gan.__all__) and (REPO / "augment_gan" / "py.typed").exists()


@pytest.mark.slow
def test_fit_synth_evaluate_from_a_fresh_interpreter(tmp_path, digits100):
    res = _run(f"""
        import augment_gan as ag
        config = ag.TrainConfig(kimg=0.032, batch_size=16, g_channels=32, d_channels=8, min_channels=8,
                                max_channels=32, z_dim=16)
        ckpt = ag.fit({str(digits100)!r}, config, "run", device="cpu", progress=False)
        summary = ag.synth(ckpt, "synthetic", n=40, progress=False, device="cpu")
        result = ag.evaluate({str(digits100)!r}, "synthetic", ag.EvaluateConfig(features="random"), progress=False)
        print(summary.written, sorted(result)[:3], ckpt.name)
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "40" and "ckpt-00000002.safetensors" in res.stdout
    assert len(list((tmp_path / "synthetic").rglob("*.png"))) == 40
