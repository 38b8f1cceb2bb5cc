"""The built wheel works on its own: installed into a fresh virtualenv outside the repository, offline, it
finds its search spaces, profiles, knowledge files and built-in backbone, and runs `recommend` and a short
`search` from another working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
          str(REPO)], cwd=out, env=dict(os.environ), timeout=300)
    return next(out.glob("automl_ad-*.whl"))


def test_wheel_ships_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("automl_ad/search_spaces/patchcore.yaml", "automl_ad/profiles/edge-cpu.yaml",
                     "automl_ad/features/weights.yaml", "automl_ad/recommend/rules.yaml",
                     "automl_ad/features/builtin/mobilenetv2_100_tflite_in1k.safetensors"):
        assert expected in names, f"{expected} is not in {wheel.name}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_wheel_installed_elsewhere_recommends_and_searches_offline(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    site = next((env_dir / "lib").glob("python*/site-packages"))
    # Dependencies come from this environment's site-packages as a plain path entry: its .pth files (among them
    # the editable install of the repository) are not processed, so automl_ad can only come from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", AUTOML_AD_OFFLINE="1", HF_HUB_OFFLINE="1")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import automl_ad; print(automl_ad.__file__)"], cwd=work, env=env)
    assert str(site) in where.stdout and str(REPO) not in where.stdout
    _run([str(bin_dir / "python"), "-c", "from automl_ad.data.demo import generate_demo; generate_demo('data', "
          "categories=['texture'], n_train=16, n_test_good=4, n_test_per_defect=2, size=64)"], cwd=work, env=env)
    recommend = _run([str(bin_dir / "automl-ad"), "recommend", "data/texture", "--profile", "edge-cpu"],
                     cwd=work, env=env)
    assert "patchcore" in recommend.stdout.lower() or "padim" in recommend.stdout.lower()
    search = _run([str(bin_dir / "automl-ad"), "search", "data/texture", "--budget", "1m",
                   "--families", "gaussian,padim"], cwd=work, env=env, timeout=420)
    assert "built into automl-ad" in search.stdout
    board = _run([str(bin_dir / "automl-ad"), "leaderboard", "--json"], cwd=work, env=env)
    assert '"padim"' in board.stdout and '"ok"' in board.stdout
