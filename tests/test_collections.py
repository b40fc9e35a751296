"Issue 11: collections through the real CLI: sharded embedding (2 processes = 1 process), resumable; search across scenes; bad inputs."
import datetime, json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from dofaclip.io import open_scene, sample_path
from dofaclip.scenes import split_bands

SRC = sample_path('landsat8_b234.tif')
CLI = [sys.executable, '-c', 'import sys; from dofaclip.cli import main; sys.exit(main(sys.argv[1:]))']

def stac_item(path, files, key, wavelengths=(0.482, 0.5613, 0.6546)):
    "A STAC item JSON over band files; `wavelengths=None` leaves out the eo:bands metadata."
    import pystac, shapely
    with rasterio.open(files[0]) as s: b = transform_bounds(s.crs, 'EPSG:4326', *s.bounds)
    item = pystac.Item(key, geometry=shapely.geometry.mapping(shapely.box(*b)), bbox=list(b), datetime=datetime.datetime(2020, 5, 18), properties={})
    for i, f in enumerate(files):
        extra = {} if wavelengths is None else {'eo:bands': [{'name': f'b{i}', 'center_wavelength': wavelengths[i]}]}
        item.add_asset(f'b{i}', pystac.Asset(href=str(f), roles=['data'], extra_fields=extra))
    item.set_self_href(str(path)); item.save_object(include_self_link=False)
    return path

@pytest.fixture(scope='module')
def coll(tmp_path_factory):
    "Three scenes from the bundled raster: per-band files (B3 at 60 m), a STAC item overlapping it, a multi-band crop; a tiny checkpoint."
    from dofaclip.testing import tiny_checkpoint
    root = tmp_path_factory.mktemp('coll')
    west = split_bands(SRC, root / 'west', crop=Window(0, 0, 128, 128), factors=[1, 2, 1], pattern='west_{name}.tif')
    east = split_bands(SRC, root / 'east', crop=Window(64, 0, 128, 128), factors=[1, 2, 1], pattern='east_{name}.tif')
    south = root / 'south.tif'
    with rasterio.open(SRC) as s:
        w = Window(0, 256, 128, 128)
        with rasterio.open(south, 'w', **{**s.profile, 'width': 128, 'height': 128, 'transform': s.window_transform(w)}) as d:
            d.write(s.read(window=w)); d.update_tags(**s.tags()); [d.update_tags(i, **s.tags(i)) for i in (1, 2, 3)]
    scenes = [','.join(map(str, west)), str(stac_item(root / 'east.json', east, 'east')), str(south)]
    return root, scenes, tiny_checkpoint(root / 'tiny', name='dofaclip-tiny')

def embed_cmd(coll, out, *extra):
    root, scenes, ckpt = coll
    return [*CLI, 'embed', *scenes, '--model', str(ckpt), '--out', str(out), '--tile-size', '64', '--preset', 'reflectance',
            '--device', 'cpu', '--cache-dir', str(out) + '-cache', '-q', *extra]

def test_sharded_equals_one_process_and_resumes(coll, capsys):
    "One process (in this one, through the CLI's main) against two separate processes with torchrun's RANK/WORLD_SIZE."
    import geopandas as gpd
    from dofaclip.embeddings import store_parts, read_vectors, read_metadata
    root = coll[0]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    code, _, err = run_main(capsys, *embed_cmd(coll, root / 'one')[len(CLI):])
    assert code == 0, err
    procs = [subprocess.Popen(embed_cmd(coll, root / 'two'), env={**env, 'RANK': str(r), 'WORLD_SIZE': '2'},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]   # as torchrun starts them: no talking
    for p in procs: assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = store_parts(root / 'one'), store_parts(root / 'two')
    assert [p.name for p in a] == [p.name for p in b] == ['east.parquet', 'south.parquet', 'west_B2.parquet']
    for x, y in zip(a, b):
        pd_x, pd_y = gpd.read_parquet(x).drop(columns='embedding'), gpd.read_parquet(y).drop(columns='embedding')
        assert pd_x.equals(pd_y)
        np.testing.assert_allclose(read_vectors(x), read_vectors(y), atol=1e-3)
        assert read_metadata(x)['model_fingerprint'] == read_metadata(y)['model_fingerprint']
    assert {read_metadata(p)['scene_id']: read_metadata(p)['valid_fraction_sample'] for p in a} == {'east': 64, 'south': 64, 'west_B2': 64}
    # resumable: a second run skips every scene (no file rewritten), an extra scene is added
    mtimes = {p.name: p.stat().st_mtime_ns for p in a}
    code, _, err = run_main(capsys, *embed_cmd(coll, root / 'one')[len(CLI):])
    assert code == 0 and 'dofaclip: 3 scene(s) of 3' in err, err
    assert {p.name: p.stat().st_mtime_ns for p in store_parts(root / 'one')} == mtimes

def run_main(capsys, *argv):
    from dofaclip.cli import main
    code = main([str(a) for a in argv]); out, err = capsys.readouterr()
    return code, out, err

def test_cli_search_across_scenes(coll, capsys, tmp_path):
    import geopandas as gpd
    from dofaclip.testing import tiny_checkpoint
    root, scenes, ckpt = coll
    store = root / 'one'
    if not store.exists(): assert run_main(capsys, *embed_cmd(coll, store)[len(CLI):])[0] == 0
    code, out, err = run_main(capsys, 'search', store, 'a river', '--top-k', 4, '--out', tmp_path / 'found', '-q')   # the store's model
    assert code == 0, err
    got = sorted(p.name for p in (tmp_path / 'found').iterdir())
    assert got == ['heatmap_a-river_east.tif', 'heatmap_a-river_south.tif', 'heatmap_a-river_west_B2.tif', 'map.html', 'summary.json', 'top4_a-river.geojson']
    hits = gpd.read_file(tmp_path / 'found' / 'top4_a-river.geojson')
    assert list(hits['rank']) == [1, 2, 3, 4] and hits.crs.to_epsg() == 4326 and (np.diff(hits.score) <= 0).all()
    with rasterio.open(tmp_path / 'found' / 'heatmap_a-river_south.tif') as h: assert h.crs.to_epsg() == 32621 and h.shape == (2, 2)
    html = (tmp_path / 'found' / 'map.html').read_text()
    assert all(f'"id": "{s}"' in html for s in ('east', 'south', 'west_B2')) and html.count('"rgb": "data:image/png') == 3
    summary = json.loads((tmp_path / 'found' / 'summary.json').read_text())
    assert summary['index'] == 'exact' and [h['rank'] for h in summary['hits']] == [1, 2, 3, 4]
    # again into the same folder: refused without --overwrite; another model: refused, naming both
    code, _, err = run_main(capsys, 'search', store, 'a river', '--top-k', 4, '--out', tmp_path / 'found')
    assert code == 1 and '--overwrite' in err
    other = tiny_checkpoint(tmp_path / 'other', name='dofaclip-tiny', seed=1)
    code, _, err = run_main(capsys, 'search', store, 'a river', '--model', other, '--out', tmp_path / 'o2')
    import re
    from dofaclip.embeddings import read_metadata
    assert code == 1 and "is not the one the store was embedded with" in err, err
    fps = set(re.findall(r'\b[0-9a-f]{20}\b', err))
    assert len(fps) == 2 and read_metadata(store / 'south.parquet')['model_fingerprint'] in fps   # both models named
    assert not (tmp_path / 'o2').exists() or not any((tmp_path / 'o2').iterdir())
    code, _, err = run_main(capsys, 'embed', scenes[2], '--model', other, '--out', store, '--tile-size', 64, '-q')
    assert code == 1 and 'built with another model' in err
    # explore takes the per-band form too (comma-joined band files, one at 60 m)
    code, _, err = run_main(capsys, 'explore', scenes[0], 'water', '--model', ckpt, '--tile-size', 64, '--preset', 'reflectance',
                            '--out', tmp_path / 'ex', '--no-html', '--cache-dir', tmp_path / 'cache', '-q')
    assert code == 0, err
    with rasterio.open(tmp_path / 'ex' / 'heatmap_water.tif') as h: assert h.shape == (2, 2) and np.isfinite(h.read(1)).any()

def test_collection_bad_inputs(coll, tmp_path, capsys):
    from dofaclip.embeddings import collection_sources
    root, scenes, ckpt = coll
    west = scenes[0].split(',')
    with pytest.raises(ValueError, match='twice'): collection_sources([west, list(reversed(west))])   # the same scene, another order
    no_bands = stac_item(tmp_path / 'bare.json', west, 'bare', wavelengths=None)
    with pytest.raises(ValueError, match='--wavelengths'): open_scene(no_bands)
    far = split_bands(SRC, tmp_path / 'far', crop=Window(512, 512, 64, 64), names=['far'])
    with pytest.raises(ValueError, match='do not overlap'): open_scene([west[0], far[0]])
    code, _, err = run_main(capsys, 'embed', str(no_bands), '--model', ckpt, '--out', tmp_path / 's', '-q')
    assert code == 1 and '--wavelengths' in err and not list(tmp_path.glob('s/*.parquet'))
    code, _, err = run_main(capsys, 'embed', scenes[2], scenes[2], '--model', ckpt, '--out', tmp_path / 's2', '-q')
    assert code == 1 and 'twice' in err
