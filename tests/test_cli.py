"""The `dofaclip` console script: `explore` writes georeferenced outputs, reuses its cache, fails clearly (issue #6)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from dofaclip.io import sample_path, open_scene

BIN = Path(sys.executable).parent


def dofaclip(*args, cache):
    exe = shutil.which('dofaclip', path=str(BIN)) or shutil.which('dofaclip')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from dofaclip.cli import main; sys.exit(main())']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DOFACLIP_CACHE': str(cache)}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


def test_explore_writes_outputs_and_reuses_cache(tmp_path):
    from dofaclip.model import create_model
    from dofaclip.weights import save_pretrained
    # a saved checkpoint: the cache key includes the weights, so two processes must load the same ones
    weights = save_pretrained(create_model('dofaclip-tiny'), tmp_path / 'tiny')
    weights = weights if weights.is_dir() else weights.parent
    scene = sample_path('landsat8_b234.tif')
    out = tmp_path / 'out'
    res = dofaclip('explore', scene, 'water', 'a town', '--model', weights, '--tile-size', 128,
                   '--classes', 'water,forest,farmland', '--top-k', 5, '--out', out, cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert f'model: DOFA-CLIP from {weights.resolve()}' in res.stdout          # says which model was used
    names = {p.name for p in out.iterdir()}
    assert {'heatmap_water.tif', 'top5_water.geojson', 'preview_water.png', 'heatmap_a-town.tif', 'classes.tif',
            'preview_classes.png', 'map.html', 'summary.json'} <= names
    src_scene = open_scene(scene)
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

    res2 = dofaclip('explore', scene, 'bare soil', '--model', weights, '--tile-size', 128, '--out', out, '--no-html',
                    cache=tmp_path / 'cache')
    assert res2.returncode == 0, res2.stderr
    assert 'read from cache' in res2.stdout
    assert json.loads((out / 'summary.json').read_text())['stats']['tiles_embedded'] == 0

    # a model with random weights is another model: it says so, and does not reuse the cache
    res3 = dofaclip('explore', scene, 'water', '--model', 'dofaclip-tiny', '--tile-size', 128, '--out', tmp_path / 'r', '--no-html',
                    cache=tmp_path / 'cache')
    assert res3.returncode == 0 and 'with RANDOM weights' in res3.stdout and 'read from cache' not in res3.stdout


def test_explore_errors_are_clear(tmp_path):
    nocrs = tmp_path / 'nocrs.tif'
    with rasterio.open(nocrs, 'w', driver='GTiff', width=32, height=32, count=3, dtype='uint16') as dst:
        dst.write(np.ones((3, 32, 32), np.uint16))
    res = dofaclip('explore', nocrs, 'water', '--model', 'dofaclip-tiny', '--wavelengths', '0.49,0.56,0.665',
                   '--out', tmp_path / 'o', cache=tmp_path / 'cache')
    assert res.returncode == 2 and 'has no CRS' in res.stderr and 'Traceback' not in res.stderr
    res = dofaclip('explore', tmp_path / 'missing.tif', 'water', '--model', 'dofaclip-tiny', '--out', tmp_path / 'o',
                   cache=tmp_path / 'cache')
    assert res.returncode == 2 and 'no such raster' in res.stderr
    res = dofaclip('explore', sample_path('landsat8_b234.tif'), 'water', '--model', 'nope', '--out', tmp_path / 'o',
                   cache=tmp_path / 'cache')
    assert res.returncode == 2 and 'is not a folder' in res.stderr
    res = dofaclip('explore', sample_path('landsat8_b234.tif'), 'water', '--model', 'dofaclip-tiny',
                   '--wavelengths', '490,560,665', '--out', tmp_path / 'o', cache=tmp_path / 'cache')
    assert res.returncode == 2 and 'nanometres' in res.stderr


def test_demo_with_given_weights(tmp_path):
    "`dofaclip demo` (the README's command) on the bundled Landsat scene; --weights skips training the demo model."
    from dofaclip.model import create_model
    from dofaclip.weights import save_pretrained
    weights = save_pretrained(create_model('dofaclip-tiny'), tmp_path / 'tiny')
    weights = weights if weights.is_dir() else weights.parent
    out = tmp_path / 'demo_out'
    res = dofaclip('demo', '--query', 'water', '--weights', weights, '--out', out, cache=tmp_path / 'cache')
    assert res.returncode == 0, res.stderr
    assert f'model: DOFA-CLIP from {weights.resolve()}' in res.stdout
    assert "query 'a satellite image of mostly water' (probability" in res.stdout      # demo phrasing + demo negatives
    assert {'heatmap_water.tif', 'top10_water.geojson', 'preview_water.png', 'classes.tif', 'map.html'} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['queries'][0]['negatives'] == ['a satellite image of mostly vegetation', 'a satellite image of mostly bare soil']
