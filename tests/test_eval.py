"`python -m dofaclip.evaluation` end to end on tiny fixtures of every dataset, in a subprocess: JSON, table, feature cache."
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip('torchgeo')
from dofaclip.datasets import (write_eurosat_fixture, write_eurosat_rgb_fixture, write_resisc45_fixture,
                                 write_bigearthnet_fixture, write_sen12ms_fixture, write_image_folder_fixture)
from dofaclip.reben import write_reben_fixture
from dofaclip.testing import tiny_checkpoint

DATASETS = ['eurosat', 'eurosat-rgb', 'resisc45', 'bigearthnet-5', 'bigearthnet-19', 'bigearthnet-43', 'sen12ms',
            'ucmerced', 'aid', 'sen12ms-10', 'bigearthnet-v2-19', 'bigearthnet-v2-5']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('eval')
    ben, s12, reben = write_bigearthnet_fixture(tmp / 'bigearthnet'), write_sen12ms_fixture(tmp / 'sen12ms'), write_reben_fixture(tmp / 'reben')
    roots = [write_eurosat_fixture(tmp / 'eurosat'), write_eurosat_rgb_fixture(tmp / 'eurosat-rgb'),
             write_resisc45_fixture(tmp / 'resisc45'), ben, ben, ben, s12,
             write_image_folder_fixture(tmp / 'ucm', ['denseresidential', 'river', 'tenniscourt'], 2, ext='.tif'),
             write_image_folder_fixture(tmp / 'aid', ['BareLand', 'StorageTanks'], 2), s12, reben, reben]
    return tmp, roots, tiny_checkpoint(tmp / 'ckpt', name='dofaclip-tiny')


def run(*args, cwd=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run([sys.executable, '-m', 'dofaclip.evaluation', *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def eval_args(tmp, roots, ckpt, out, *extra):
    args = ['--model', ckpt, '--device', 'cpu', '--out', out, '--cache-dir', tmp / 'cache', '-q', *extra]
    for name, root in zip(DATASETS, roots): args += ['--dataset', name, '--root', root]
    return args


def test_eval_writes_table_and_reuses_features(setup):
    tmp, roots, ckpt = setup
    first = run(*eval_args(tmp, roots, ckpt, tmp / 'out1'))
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp / 'out1' / 'eval.json').read_text())
    results = {r['dataset']: r for r in report['results']}
    assert list(results) == DATASETS
    assert all(r['features'] == 'computed' for r in results.values())
    assert all(0 <= r['zeroshot'] <= 1 for r in results.values())
    assert results['bigearthnet-43']['n_classes'] == 43 and results['bigearthnet-5']['metric'] == 'macro AP'
    assert results['eurosat']['metric'] == 'top-1' and len(results['eurosat']['wavelengths']) == 13
    assert set(results['sen12ms']['retrieval']) == {'ms->rgb', 'rgb->ms'}
    assert list(results['sen12ms']['retrieval']['ms->rgb']) == ['R@1', 'R@5', 'R@10', 'R@20', 'R@50']
    assert results['aid']['classnames'] == ['bare land', 'storage tanks']
    assert (results['sen12ms']['n_classes'], results['sen12ms-10']['n_classes']) == (9, 10)          # paper's 9, dataset's 10
    assert results['bigearthnet-v2-19']['n_classes'] == 19 and results['bigearthnet-v2-5']['n_classes'] == 5
    assert set(results['bigearthnet-v2-19']['retrieval']) == {'ms->rgb', 'rgb->ms'}
    assert report['ap_convention'] == 'torchmetrics'
    table = (tmp / 'out1' / 'eval.md').read_text()
    header = '| model | ' + ' | '.join(f"{n} ({results[n]['metric']})" for n in DATASETS) + ' | average |'
    assert header in table
    assert f"{100 * report['average_zeroshot']:.2f} |" in table
    for r in results.values(): assert r['prompt_version'] in table   # every prompt set printed with its version
    assert table in first.stdout                                      # the table also goes to stdout

    cache_files = {p: p.stat().st_mtime_ns for p in (tmp / 'cache').rglob('*.pt')}
    assert cache_files and not list((tmp / 'cache').rglob('*.tmp'))
    second = run(*eval_args(tmp, roots, ckpt, tmp / 'out2', '--probe'))
    assert second.returncode == 0, second.stderr
    again = {r['dataset']: r for r in json.loads((tmp / 'out2' / 'eval.json').read_text())['results']}
    assert all(r['features'] == 'cached' for r in again.values())     # the test split is not encoded again
    assert all(again[n]['zeroshot'] == results[n]['zeroshot'] for n in DATASETS)
    assert {p: p.stat().st_mtime_ns for p in cache_files} == cache_files   # cached files untouched
    assert 'score' in again['eurosat']['probe'] and 'skipped' in again['ucmerced']['probe']
    assert '## Linear probe' in (tmp / 'out2' / 'eval.md').read_text()


def test_eval_errors_are_one_line(setup):
    tmp, roots, ckpt = setup
    bad_root = run('--model', ckpt, '--dataset', 'eurosat', '--root', tmp / 'nowhere', '--device', 'cpu', '-q',
                   '--cache-dir', tmp / 'cache', '--out', tmp / 'bad')
    assert bad_root.returncode == 1 and bad_root.stderr.startswith('dofaclip: error: ') and 'Traceback' not in bad_root.stderr
    assert 'does not exist' in bad_root.stderr and not (tmp / 'bad').exists()
    bad_split = run('--model', ckpt, '--dataset', 'sen12ms', '--root', roots[6], '--split', 'val', '--device', 'cpu',
                    '-q', '--cache-dir', tmp / 'cache', '--out', tmp / 'bad')
    assert bad_split.returncode == 1 and "splits ['train', 'test']" in bad_split.stderr
    usage = run('--model', ckpt, '--dataset', 'eurosat', '--dataset', 'resisc45', '--root', 'a', '--root', 'b', '--root', 'c')
    assert usage.returncode == 2 and 'one root for all' in usage.stderr
    unknown = run('--model', ckpt, '--dataset', 'imagenet', '--root', 'a')
    assert unknown.returncode == 2 and 'unknown dataset' in unknown.stderr


def test_rgb_only_model_on_multispectral_set(setup):
    tmp, roots, ckpt = setup
    args = ['--model', 'open_clip:ViT-B-32', '--dataset', 'eurosat', '--root', roots[0], '--device', 'cpu', '-q',
            '--cache-dir', tmp / 'cache', '--out', tmp / 'rgb_only']
    no_wavelengths = run(*args)
    assert no_wavelengths.returncode == 1 and '--bands rgb' in no_wavelengths.stderr


def test_dofaclip_eval_command(setup):
    "The same evaluation through the `dofaclip` console script (`dofaclip eval`), as the README shows it."
    tmp, roots, ckpt = setup
    exe = Path(sys.executable).parent / 'dofaclip'
    cmd = [str(exe), 'eval', '--model', str(ckpt), '--dataset', 'eurosat', '--root', str(roots[0]), '--device', 'cpu',
           '--out', str(tmp / 'cli_out'), '--cache-dir', str(tmp / 'cache'), '-q']
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp / 'cli_out' / 'eval.json').read_text())
    assert [r['dataset'] for r in report['results']] == ['eurosat'] and 'eurosat' in (tmp / 'cli_out' / 'eval.md').read_text()
    bad = subprocess.run([str(exe), 'eval', '--model', str(ckpt), '--dataset', 'eurosat', '--root', str(tmp / 'nowhere')],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr and bad.stderr.count('dofaclip: error:') == 1
