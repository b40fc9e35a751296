"""A real install (issue #10): the wheel built from this working tree, installed into a fresh virtual environment,
runs the command line, the demo and the README's Python example from a folder outside the repository.

Nothing is downloaded: the wheel is built without build isolation, installed with `--no-deps --no-index`, and the
fresh environment sees this environment's third-party packages (torch, rasterio, ...) through a `.pth` file. A
`.pth` line only adds a folder to `sys.path`; the `.pth` files inside that folder (among them the editable install
of dofaclip) are not run, so `import dofaclip` can only find the wheel's copy, which the tests check."""
import json, os, re, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import dofaclip

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ('landsat8_b234.tif', 'rgbn_5m_20160101.tif', 'rgbn_5m_20170203.tif', 'README.md')


def run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def readme_example() -> str:
    "The Python block under '## Use it' in README.md."
    text = (ROOT / 'README.md').read_text()
    section = text.split('\n## Use it', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, re.S)
    assert blocks, "README.md has no ```python block under '## Use it'"
    return blocks[0]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('install')
    src = tmp / 'src'      # a copy of what the wheel is built from: the build leaves nothing in the checkout
    src.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'): shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / 'dofaclip', src / 'dofaclip', ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.tmp'))
    run([sys.executable, '-m', 'pip', 'wheel', src, '--no-deps', '--no-build-isolation', '--no-index', '-q', '-w', tmp / 'dist'])
    wheel = next((tmp / 'dist').glob('dofaclip-*.whl'))
    venv = tmp / 'venv'
    run([sys.executable, '-m', 'venv', '--without-pip', venv])
    py = venv / 'bin' / 'python'
    run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-deps', '--no-index', '-q', wheel])
    site = run([py, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))']).stdout.strip()
    (Path(site) / '_dofaclip_test_deps.pth').write_text(sysconfig.get_path('purelib') + '\n')
    work = tmp / 'work'    # a folder with no dofaclip/ in it, as a user's
    work.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'DOFACLIP_DATA', 'PYTHONHOME')}
    environ.update(PATH=f"{venv / 'bin'}{os.pathsep}{environ.get('PATH', '')}", OMP_NUM_THREADS='1',
                   DOFACLIP_CACHE=str(tmp / 'cache'), DOFACLIP_QUIET='1')
    return SimpleNamespace(wheel=wheel, venv=venv.resolve(), py=py, bin=venv / 'bin', work=work, env=environ, tmp=tmp)


def in_venv(env, *cmd):
    return run(cmd, cwd=env.work, env=env.env)


def test_wheel_carries_the_sample_rasters(env):
    names = set(zipfile.ZipFile(env.wheel).namelist())
    assert {f'dofaclip/samples/{n}' for n in SAMPLES} <= names
    assert 'dofaclip/cli.py' in names and 'dofaclip/testing.py' in names


def test_package_and_samples_come_from_the_wheel(env):
    out = in_venv(env, env.py, '-c', "import dofaclip, dofaclip.io as io; print(dofaclip.__file__); "
                                    "print(io.sample_path('landsat8_b234.tif'))").stdout.split()
    assert all(Path(p).resolve().is_relative_to(env.venv) for p in out), out


def test_console_script(env):
    res = in_venv(env, env.bin / 'dofaclip', '--version')
    assert res.stdout.strip() == f'dofaclip {dofaclip.__version__}'
    res = in_venv(env, env.bin / 'dofaclip', 'demo', '--help')
    assert all(f in res.stdout for f in ('--model', '--device', '--tokenizer', '--overwrite', '--quiet'))


def test_readme_example(env):
    (env.work / 'readme_example.py').write_text(readme_example())
    res = in_venv(env, env.py, 'readme_example.py')
    assert 'tensor(' in res.stdout, res.stdout


def test_demo_from_the_wheel(env):
    "`dofaclip demo` explores the bundled scene that the wheel carries (a given tiny model: no training here)."
    model = run([sys.executable, '-c', "import sys; from dofaclip.testing import tiny_checkpoint; "
                 "print(tiny_checkpoint(sys.argv[1], name='dofaclip-tiny'))", env.tmp / 'tiny']).stdout.strip()
    res = in_venv(env, env.bin / 'dofaclip', 'demo', '--model', model, '--out', 'demo_out', '--no-html')
    assert 'model: DOFA-CLIP from' in res.stdout
    summary = json.loads((env.work / 'demo_out' / 'summary.json').read_text())
    assert Path(summary['scene']).resolve().is_relative_to(env.venv) and Path(summary['scene']).name == 'landsat8_b234.tif'
    assert {'heatmap_water.tif', 'classes.tif'} <= {p.name for p in (env.work / 'demo_out').iterdir()}


def test_datasets_extra_is_optional(env):
    "Without torchgeo (`dofaclip[datasets]`) the package imports; the dataset readers say what to install."
    code = ("import sys; sys.modules['torchgeo'] = None\n"
            "import dofaclip.datasets as b, dofaclip.cli, dofaclip.explore\n"
            "try: b.eurosat(sys.argv[1])\n"
            "except ImportError as e: print(e)")
    res = in_venv(env, env.py, '-c', code, env.work)
    assert "pip install 'dofaclip[datasets]'" in res.stdout, res.stdout
