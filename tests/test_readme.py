"""The README runs as written: its shell blocks on a copy of examples/, its Python block on their output.

Budgets are shrunk by the substitutions below (each must still match the README, so they stay in sync),
and the parts that install packages, rerun this test suite or need several processes are skipped by name.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250

# (pattern, replacement): what the README asks for -> what the test runs, so that every command of the
# README runs in about a minute on two CPU cores. Each pattern must match at least once.
SUBSTITUTIONS = [
    # A wall-clock minute of `fit` becomes 25 images (--minutes 2 -> --kimg 0.05: two steps of batch 32).
    (r"--minutes (\d+(?:\.\d+)?)", lambda m: f"--kimg {0.025 * float(m.group(1)):g}"),
    (r"--n 1000\b", "--n 20"),                      # synth: 2 images per class instead of 100
    (r"--per-class 50\b", "--per-class 2"),
    (r"--copies 4\b", "--copies 1"),                # merge
    # evaluate: a 10-step feature classifier, and one 5-step downstream classifier per arm.
    (r"\bevaluate (?=--real)", "evaluate --feature-steps 10 --seeds 1 --steps 5 --batch-size 16 "),
    (r"(examples/train_classifier\.py)", r"\1 --steps 8 --batch-size 16"),
    (r"\baugment (?=examples)", "augment --steps 5 --seeds 1 "),   # augment: one 5-step classifier per arm
]

# Commands the test does not run, each listed exactly as the README writes it.
SKIPPED = {
    "python3 -m venv .venv",                        # the test already runs inside an environment
    ". .venv/bin/activate",
    "pip install .",
    'pip install -e ".[dev]"',
    "python -m pytest",                             # this test suite itself
    # Two processes training for the default 5 minutes (test_fit covers two gloo ranks).
    "torchrun --nproc_per_node 2 -m augment_gan fit examples/digits --out runs/ddp",
}

# What the README's commands leave behind, checked after they ran.
OUTPUTS = ["runs/digits/config.json", "synthetic/digits/manifest.jsonl", "runs/emoji/report.html",
           "synthetic/digits-38/manifest.jsonl", "synthetic/digits-sharded/manifest.jsonl",
           "synthetic/digits-tar/shard-000000.tar",
           "variations/digits-7", "my-recipe.yaml", "merged/digits/merge.json", "eval/digits/metrics.json",
           "runs/digits/report.html", "runs/emoji64/config.json", "digits-inspect.json",
           "augmented/digits/decision.json"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def _commands(block: str) -> list[str]:
    """The commands of a shell block: one per line and per `&&`, comments removed."""
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def _shell_script() -> tuple[str, list[str], list[int]]:
    """(script, skipped commands, use count of each substitution)."""
    used = [0] * len(SUBSTITUTIONS)
    run, skipped = [], []
    for block in _blocks("bash"):
        for command in _commands(block):
            if command in SKIPPED:
                skipped.append(command)
                continue
            for i, (pattern, replacement) in enumerate(SUBSTITUTIONS):
                command, count = re.subn(pattern, replacement, command)
                used[i] += count
            run.append(command)
    # `augment-gan` and `python` are this interpreter's; a failing command stops the script, and the trace
    # (set -x) shows which one it was.
    script = "\n".join(['set -euxo pipefail', 'augment-gan() { "$PYTHON" -m augment_gan "$@"; }',
                        'python() { "$PYTHON" "$@"; }', *run]) + "\n"
    return script, skipped, used


def test_readme_is_a_short_manual():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_LINES}"
    assert "benchmarks/RESULTS.md" in README.read_text(encoding="utf-8")
    assert (ROOT / "benchmarks" / "RESULTS.md").is_file()


def test_substitutions_and_skips_match_the_readme():
    _, skipped, used = _shell_script()
    assert set(skipped) == SKIPPED, "a skipped command changed in the README: update SKIPPED"
    unused = [SUBSTITUTIONS[i][0] for i, n in enumerate(used) if n == 0]
    assert not unused, f"substitutions no longer match the README: {unused}"
    assert len(_blocks("python")) == 1


@pytest.mark.slow
def test_readme_blocks_run_on_the_bundled_examples(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    script, _, _ = _shell_script()
    (tmp_path / "readme.sh").write_text(script)
    # Two threads: the machine running the tests has two cores; the cache stays in the session's temp dir.
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"a README shell command failed:\n{result.stderr[-3000:]}"
    missing = [path for path in OUTPUTS if not (tmp_path / path).exists()]
    assert not missing, f"README commands did not write {missing}"

    # The Python block, as written, on the 32 px synthetic digits the set-up command wrote.
    from PIL import Image
    with Image.open(next((tmp_path / "synthetic" / "digits" / "0").glob("*.png"))) as image:
        assert image.size == (32, 32)
    (tmp_path / "snippet.py").write_text(_blocks("python")[0])
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"the README's Python block failed:\n{result.stderr[-3000:]}"
    assert "torch.Size([64, 3," in result.stdout, result.stdout
