"""The `dofaclip` console script, run as a user runs it: a subprocess, the bundled Landsat-8 scene, real checkpoint and
tokenizer folders (built offline by `dofaclip.testing`). Outputs, cache, models and tokenizers, devices, progress,
`--overwrite`, exit codes (issues #6, #10)."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio

import dofaclip
from dofaclip.io import sample_path, open_scene

BIN = Path(sys.executable).parent
LANDSAT = sample_path('landsat8_b234.tif')


def dofaclip_cli(*args, cache, **env):
    exe = shutil.which('dofaclip', path=str(BIN)) or shutil.which('dofaclip')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from dofaclip.cli import main; sys.exit(main())']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DOFACLIP_CACHE': str(cache), **env}
    env.pop('DOFACLIP_QUIET', None)
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


def user_error(res, code=1):
    "A problem of the user's input: the expected exit status, one `dofaclip: error:` line, no traceback."
    assert res.returncode == code, (res.returncode, res.stderr)
    assert 'Traceback' not in res.stderr, res.stderr
    assert re.search(r'^dofaclip( \w+)?: error: ', res.stderr, re.M), res.stderr   # argparse names the command
    return res.stderr


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "Checkpoint folders in open_clip's hub layout and a SigLIP tokenizer folder, written offline."
    from dofaclip.testing import tiny_checkpoint, siglip_tokenizer_folder
    root = tmp_path_factory.mktemp('checkpoints')
    return SimpleNamespace(tiny=tiny_checkpoint(root / 'tiny', name='dofaclip-tiny'),
                           siglip=tiny_checkpoint(root / 'siglip'),
                           siglip_with_tokenizer=tiny_checkpoint(root / 'siglip-tok', tokenizer=True),
                           tokenizer=siglip_tokenizer_folder(root / 'tokenizer'))


def test_explore_writes_outputs_and_reuses_cache(tmp_path, ckpt):
    weights, out = ckpt.tiny, tmp_path / 'out'
    res = dofaclip_cli('explore', LANDSAT, 'water', 'a town', '--model', weights, '--tile-size', 128,
                       '--classes', 'water', '--classes', 'forest', '--classes', 'farmland', '--top-k', 5, '--out', out,
                       cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert f'model: DOFA-CLIP from {weights.resolve()}' in res.stdout          # says which model was used
    names = {p.name for p in out.iterdir()}
    assert {'heatmap_water.tif', 'top5_water.geojson', 'preview_water.png', 'heatmap_a-town.tif', 'classes.tif',
            'preview_classes.png', 'map.html', 'summary.json'} <= names
    assert not [n for n in names if n.startswith('.')]                         # no staging folder left behind
    src_scene = open_scene(LANDSAT)
    with rasterio.open(out / 'heatmap_water.tif') as src:
        assert src.crs == src_scene.crs and src.res == (128 * 30.0, 128 * 30.0)
        heat = src.read(1)
        assert np.isfinite(heat).sum() > 0.5 * heat.size and src.tags()['query'] == 'water'
    feats = json.loads((out / 'top5_water.geojson').read_text())['features']
    assert len(feats) == 5 and [f['properties']['rank'] for f in feats] == [1, 2, 3, 4, 5]
    W, S, E, N = src_scene.bounds_4326
    lon, lat = np.array(feats[0]['geometry']['coordinates'][0]).T
    assert W - 1e-6 <= lon.min() and lon.max() <= E + 1e-6 and S - 1e-6 <= lat.min() and lat.max() <= N + 1e-6
    first = json.loads((out / 'summary.json').read_text())
    assert first['stats']['from_cache'] is False and first['stats']['tiles_embedded'] > 0
    assert first['classes']['prompts'] == ['water', 'forest', 'farmland']

    res2 = dofaclip_cli('explore', LANDSAT, 'bare soil', '--model', weights, '--tile-size', 128, '--out', out, '--no-html',
                        '--overwrite', cache=tmp_path / 'cache')
    assert res2.returncode == 0, res2.stderr
    assert 'read from cache' in res2.stdout
    assert json.loads((out / 'summary.json').read_text())['stats']['tiles_embedded'] == 0

    # a model with random weights is another model: it says so, and does not reuse the cache
    res3 = dofaclip_cli('explore', LANDSAT, 'water', '--model', 'dofaclip-tiny', '--tile-size', 128, '--out', tmp_path / 'r',
                        '--no-html', cache=tmp_path / 'cache')
    assert res3.returncode == 0 and 'with RANDOM weights' in res3.stdout and 'read from cache' not in res3.stdout


def test_input_errors_exit_1_with_one_line(tmp_path):
    "Bad files, models, wavelengths, devices: exit 1, one `dofaclip: error:` line that says what to fix, no traceback."
    nocrs = tmp_path / 'nocrs.tif'
    with rasterio.open(nocrs, 'w', driver='GTiff', width=32, height=32, count=3, dtype='uint16') as dst:
        dst.write(np.ones((3, 32, 32), np.uint16))
    run = lambda *a, **env: dofaclip_cli('explore', *a, '--out', tmp_path / 'o', cache=tmp_path / 'cache', **env)
    assert 'has no CRS' in user_error(run(nocrs, 'water', '--model', 'dofaclip-tiny', '--wavelengths', '0.49,0.56,0.665'))
    assert 'no such raster' in user_error(run(tmp_path / 'missing.tif', 'water', '--model', 'dofaclip-tiny'))
    assert 'is not a folder' in user_error(run(LANDSAT, 'water', '--model', 'nope'))
    assert 'nanometres' in user_error(run(LANDSAT, 'water', '--model', 'dofaclip-tiny', '--wavelengths', '490,560,665'))
    err = user_error(run(LANDSAT, 'water', '--model', 'hf-hub:dofaclip-tests/no-such-model', HF_HUB_OFFLINE='1'))
    assert 'Hugging Face hub' in err and '--model FOLDER' in err                    # no network: says what to do
    assert not (tmp_path / 'o').exists()                                             # nothing written


def test_usage_errors_exit_2(tmp_path):
    run = lambda *a: dofaclip_cli(*a, cache=tmp_path / 'cache')
    assert 'required: --model' in user_error(run('explore', LANDSAT, 'water'), 2)
    assert 'unrecognized arguments' in user_error(run('explore', LANDSAT, 'water', '--model', 'm', '--bogus'), 2)
    assert "invalid int value: 'abc'" in user_error(run('explore', LANDSAT, 'water', '--model', 'm', '--tile-size', 'abc'), 2)
    assert 'expected numbers' in user_error(run('explore', LANDSAT, 'water', '--model', 'm', '--wavelengths', 'a,b'), 2)
    assert 'at least one query' in user_error(run('explore', LANDSAT, '--model', 'm'), 2)
    # the old comma-separated --classes is refused rather than silently read as one class
    assert 'repeat --classes' in user_error(run('explore', LANDSAT, 'water', '--model', 'm', '--classes', 'water,forest'), 2)
    assert 'required: command' in user_error(run(), 2)


def test_version_help_and_light_import(tmp_path):
    res = dofaclip_cli('--version', cache=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f'dofaclip {dofaclip.__version__}'
    res = dofaclip_cli('explore', '--help', cache=tmp_path)
    assert res.returncode == 0 and all(f in res.stdout for f in ('--device', '--tokenizer', '--overwrite', '--quiet', 'hf-hub:'))
    # --help answers at once because the CLI module imports only the standard library (the time itself: nbs/17_cli)
    probe = "import sys, dofaclip.cli; print([m for m in ('numpy', 'torch', 'rasterio', 'dofaclip.explore') if m in sys.modules])"
    assert subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True).stdout.strip() == '[]'


def test_siglip_checkpoint_with_tokenizer_folder(tmp_path, ckpt):
    out = tmp_path / 'out'
    res = dofaclip_cli('explore', LANDSAT, 'water', '--model', ckpt.siglip, '--tokenizer', ckpt.tokenizer, '--tile-size', 128,
                       '--out', out, cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert {'heatmap_water.tif', 'top10_water.geojson', 'map.html', 'summary.json'} <= {p.name for p in out.iterdir()}
    with rasterio.open(out / 'heatmap_water.tif') as src: assert src.crs == open_scene(LANDSAT).crs


def test_siglip_checkpoint_with_its_own_tokenizer_files(tmp_path, ckpt):
    "A hub snapshot holds the tokenizer files beside the weights: no --tokenizer needed (load_pretrained records the folder)."
    out = tmp_path / 'out'
    res = dofaclip_cli('explore', LANDSAT, 'water', '--model', ckpt.siglip_with_tokenizer, '--tile-size', 128, '--out', out,
                       cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert {'heatmap_water.tif', 'top10_water.geojson', 'map.html'} <= {p.name for p in out.iterdir()}


def test_siglip_checkpoint_without_tokenizer_names_the_option(tmp_path, ckpt):
    res = dofaclip_cli('explore', LANDSAT, 'water', '--model', ckpt.siglip, '--tile-size', 128, '--out', tmp_path / 'out',
                       cache=tmp_path / 'cache')
    assert '--tokenizer FOLDER' in user_error(res)
    assert not (tmp_path / 'out').exists()


def test_progress_on_stderr_and_quiet(tmp_path, ckpt):
    args = ('explore', LANDSAT, 'water', '--model', ckpt.tiny, '--tile-size', 128, '--no-html')
    res = dofaclip_cli(*args, '--out', tmp_path / 'a', cache=tmp_path / 'cache-a')
    assert res.returncode == 0, res.stderr
    assert re.search(r'\d+%\|', res.stderr) and 'tile' in res.stderr, res.stderr      # a tqdm bar counting tiles
    assert 'model: ' in res.stdout and 'model: ' not in res.stderr                       # results on stdout, bars on stderr
    res = dofaclip_cli(*args, '--out', tmp_path / 'b', '-q', cache=tmp_path / 'cache-b')  # a fresh cache: embeds again
    assert res.returncode == 0, res.stderr
    assert not re.search(r'\d+%\|', res.stderr) and 'tile' not in res.stderr, res.stderr
    assert json.loads((tmp_path / 'b' / 'summary.json').read_text())['stats']['tiles_embedded'] > 0


def test_overwrite(tmp_path, ckpt):
    out = tmp_path / 'out'
    run = lambda *a: dofaclip_cli('explore', LANDSAT, 'water', '--model', ckpt.tiny, '--tile-size', 256, '--no-html',
                                  '--out', out, *a, cache=tmp_path / 'cache')
    assert run().returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = user_error(run('--negative', 'forest'))                   # an earlier run is there: refused, untouched
    assert 'already holds heatmap_water.tif' in err and '--overwrite' in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = run('--negative', 'forest', '--overwrite')
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['queries'][0]['kind'] == 'probability'           # the new run replaced the old one
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # the same files, no staging folder left


def test_classes_with_commas_and_device(tmp_path, ckpt):
    import torch
    out = tmp_path / 'out'
    res = dofaclip_cli('explore', LANDSAT, '--model', ckpt.tiny, '--tile-size', 256, '--no-html', '--device', 'cpu',
                       '--classes', 'water, lakes and rivers', '--classes', 'forest', '--out', out, cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['classes']['prompts'] == ['water, lakes and rivers', 'forest'] and summary['queries'] == []
    res = dofaclip_cli('explore', LANDSAT, 'water', '--model', ckpt.tiny, '--tile-size', 256, '--no-html', '--device', 'cuda',
                       '--out', tmp_path / 'gpu', cache=tmp_path / 'cache')
    if torch.cuda.is_available(): assert res.returncode == 0, res.stderr
    else: assert 'no CUDA GPU' in user_error(res) and '--device cpu' in res.stderr


def test_demo_with_given_model(tmp_path, ckpt):
    "`dofaclip demo` (the README's command) on the bundled Landsat scene; --model skips training the demo model."
    weights, out = ckpt.tiny, tmp_path / 'demo_out'
    res = dofaclip_cli('demo', '--query', 'water', '--model', weights, '--out', out, cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert f'model: DOFA-CLIP from {weights.resolve()}' in res.stdout
    assert "query 'a satellite image of mostly water' (probability" in res.stdout      # demo phrasing + demo negatives
    assert {'heatmap_water.tif', 'top10_water.geojson', 'preview_water.png', 'classes.tif', 'map.html'} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['queries'][0]['negatives'] == ['a satellite image of mostly vegetation', 'a satellite image of mostly bare soil']
    res = dofaclip_cli('demo', '--query', 'water', '--weights', weights, '--out', out, cache=tmp_path / 'cache')
    assert 'already holds' in user_error(res)                     # refused before any model is loaded or trained
