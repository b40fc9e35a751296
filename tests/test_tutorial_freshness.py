"The test command's freshness check of tutorial outputs (tools/run_tests.py): fresh passes, changed code fails."
import importlib.util, json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('run_tests', ROOT / 'tools' / 'run_tests.py')
run_tests = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_tests)
TUTORIAL = ROOT / 'nbs' / 'tutorials' / '01_any_bands.ipynb'


def copy_setup(tmp_path):
    "A copy of the package's modules and of one tutorial, to change freely."
    pkg = tmp_path / 'dofaclip'; pkg.mkdir()
    for f in (ROOT / 'dofaclip').glob('*.py'): shutil.copy(f, pkg / f.name)
    nb = tmp_path / TUTORIAL.name
    data = json.loads(TUTORIAL.read_text()); data['metadata'].pop(run_tests.STAMP_KEY, None)   # as before `make tutorials`
    nb.write_text(json.dumps(data))
    return pkg, nb


def test_imports_are_followed_transitively(tmp_path):
    pkg, nb = copy_setup(tmp_path)
    modules = run_tests.tutorial_fingerprint(nb, pkg)['modules']
    assert {f'dofaclip.{m}' for m in ('io', 'model', 'sensors', 'scaling', 'scenes', 'cache')} <= set(modules)   # io -> scenes -> cache
    assert not {'dofaclip.pretrain', 'dofaclip.cli', 'dofaclip.explore'} & set(modules)      # what it does not use does not count


def test_fresh_passes_changed_fails(tmp_path):
    pkg, nb = copy_setup(tmp_path)
    assert run_tests.tutorial_staleness(nb, pkg) == 'no fingerprint recorded'
    run_tests.stamp_tutorial(nb, pkg)
    assert run_tests.tutorial_staleness(nb, pkg) == ''
    (pkg / 'scaling.py').write_text((pkg / 'scaling.py').read_text() + '\n# changed\n')  # a module it imports indirectly
    assert run_tests.tutorial_staleness(nb, pkg) == 'changed since its outputs were saved: dofaclip.scaling'
    run_tests.stamp_tutorial(nb, pkg)
    (pkg / 'pretrain.py').write_text('# a module it does not import\n')
    assert run_tests.tutorial_staleness(nb, pkg) == ''
    data = json.loads(nb.read_text())
    next(c for c in data['cells'] if c['cell_type'] == 'code')['source'].append('\nprint(1)')
    nb.write_text(json.dumps(data))
    assert run_tests.tutorial_staleness(nb, pkg) == 'changed since its outputs were saved: its code cells'


def test_nbdev_clean_keeps_the_fingerprint(tmp_path):
    "`nbdev-clean` (the command, with the project's pyproject.toml) keeps the recorded fingerprint whole."
    pkg, nb = copy_setup(tmp_path)
    shutil.copy(ROOT / 'pyproject.toml', tmp_path / 'pyproject.toml')
    (tmp_path / 'nbs').mkdir(); nb = nb.rename(tmp_path / 'nbs' / nb.name)
    run_tests.stamp_tutorial(nb, pkg)
    stamped = json.loads(nb.read_text())['metadata'][run_tests.STAMP_KEY]
    subprocess.run([str(Path(sys.executable).parent / 'nbdev-clean'), '--fname', str(nb)], cwd=tmp_path, check=True)
    assert json.loads(nb.read_text())['metadata'][run_tests.STAMP_KEY] == stamped
    assert run_tests.tutorial_staleness(nb, pkg) == ''


def test_runner_names_the_stale_tutorial(tmp_path):
    "The runner's failure line names the tutorial, the fix and what changed."
    pkg, nb = copy_setup(tmp_path)
    run_tests.stamp_tutorial(nb, pkg)
    assert run_tests.stale_message(nb, pkg) == ''
    (pkg / 'io.py').write_text((pkg / 'io.py').read_text() + '\n')
    assert run_tests.stale_message(nb, pkg) == (f'tutorial {nb.name} is stale: run `make tutorials` '
                                                '(changed since its outputs were saved: dofaclip.io)')
