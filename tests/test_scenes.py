"Issue 11: scenes from per-band files, SAFE folders and STAC items; embeddings as GeoParquet, read by geopandas and DuckDB; search."
import datetime, json, os
from pathlib import Path
import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from dofaclip.io import open_scene, sample_path
from dofaclip.scenes import StackScene, split_bands, open_safe, open_stac_item

CROP = Window(0, 0, 192, 192)
NAME = 'LC08_L1TP_224078_20200518_{name}.tif'

@pytest.fixture(scope='module')
def ref():
    with rasterio.open(sample_path('landsat8_b234.tif')) as s: return s.read(window=CROP).astype(np.float32)

@pytest.fixture(scope='module')
def bands(tmp_path_factory):
    "B2, B4 at 30 m and B3 at 60 m, one GeoTIFF each (tags and descriptions of the original)."
    return split_bands(sample_path('landsat8_b234.tif'), tmp_path_factory.mktemp('bands'), factors=[1, 2, 1], crop=CROP, pattern=NAME)

@pytest.fixture(scope='module')
def tiny():
    import torch
    from dofaclip.model import create_model
    torch.manual_seed(0)
    return create_model('dofaclip-tiny')

def write_mtd(folder, level, baseline, offset):
    tag, q = ('BOA_ADD_OFFSET', 'BOA_QUANTIFICATION_VALUE') if level == 'L2A' else ('RADIO_ADD_OFFSET', 'QUANTIFICATION_VALUE')
    offs = ''.join(f'<{tag} band_id="{i}">{offset}</{tag}>' for i in range(13))
    (folder / f'MTD_MSI{level}.xml').write_text(
        f'<?xml version="1.0"?><n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd">'
        f'<n1:General_Info><Product_Info><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info><Product_Image_Characteristics>'
        f'<QUANTIFICATION_VALUES_LIST><{q}>10000</{q}></QUANTIFICATION_VALUES_LIST><{tag}_VALUES_LIST>{offs}</{tag}_VALUES_LIST>'
        f'</Product_Image_Characteristics></n1:General_Info></n1:Level-1C_User_Product>')

def test_stack_equals_multiband_where_resolutions_match(bands, ref):
    scene = open_scene(list(reversed(bands)))          # any order
    assert type(scene) is StackScene and scene.band_names == ['B4', 'B3', 'B2']
    assert (scene.width, scene.height, scene.res) == (192, 192, (30.0, 30.0))
    px, valid = scene.read()
    np.testing.assert_array_equal(px[0], ref[2]); np.testing.assert_array_equal(px[2], ref[0])
    assert px[1].shape == (192, 192)                   # the 60 m band on the 30 m grid, close to the original
    assert abs(px[1][valid].mean() / ref[1][valid].mean() - 1) < 0.01
    coarse = open_scene(bands, resolution=60)           # a resolution the user names
    assert (coarse.width, coarse.height) == (96, 96) and coarse.read(Window(4, 4, 16, 16))[0].shape == (3, 16, 16)
    win = Window(-8, 100, 32, 32)                       # past the edge: as the multi-band Scene reads it
    two = StackScene([bands[0], bands[2]]).read(win); one = open_scene(sample_path('landsat8_b234.tif')).read(win)
    np.testing.assert_array_equal(two[1], one[1]); np.testing.assert_array_equal(two[0], one[0][[0, 2]])

def test_safe_l1c_offsets_applied(tmp_path, ref):
    from dofaclip.scaling import choose_scaling
    safe = tmp_path / 'S2A_MSIL1C_20200518T133229_N0400_R081_T21KXT_20200518T150000.SAFE'
    img = safe / 'GRANULE' / 'L1C_T21KXT_A025622_20200518T133229' / 'IMG_DATA'
    split_bands(sample_path('landsat8_b234.tif'), img, names=['B02', 'B03', 'B04'], crop=CROP, factors=[1, 1, 2],
                pattern='T21KXT_20200518T133229_{name}.jp2',
                driver='JP2OpenJPEG' if 'JP2OpenJPEG' in rasterio.drivers.raster_driver_extensions().values() else 'GTiff')
    write_mtd(safe, 'L1C', '04.00', -1000)
    scene = open_scene(safe, bands=['B02', 'red'])
    assert scene.band_names == ['B02', 'B04'] and scene.wavelengths == [0.49, 0.665] and scene.sensor == 'sentinel-2-l1c'
    assert (scene.width, scene.height) == (192, 192)   # the 10 m grid (B02), B04 resampled from 20 m
    px, valid = scene.read()
    np.testing.assert_array_equal(px[0][valid], ref[0][valid] - 1000)
    preset, why = choose_scaling(scene)                # the applied offset leaves reflectance x 10^4
    assert preset == (0.0, 10000.0), (preset, why)
    with pytest.raises(ValueError, match='no band file for B05'): open_safe(safe)
    write_mtd(safe, 'L1C', '02.09', 0)
    np.testing.assert_array_equal(open_safe(safe, bands=['B02']).read()[0][0][valid], ref[0][valid])

def test_stac_item_eo_bands(tmp_path, bands, ref):
    import pystac
    with rasterio.open(bands[0]) as s: b = transform_bounds(s.crs, 'EPSG:4326', *s.bounds)
    item = pystac.Item('crop', geometry=dict(type='Polygon', coordinates=[[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]),
                       bbox=list(b), datetime=datetime.datetime(2020, 5, 18), properties={})
    for f, key, w in zip(bands, ['blue', 'green', 'red'], [0.48, 0.56, 0.655]):
        item.add_asset(key, pystac.Asset(href=str(f), roles=['data'], extra_fields={
            'eo:bands': [{'name': key.upper(), 'common_name': key, 'center_wavelength': w}], 'raster:bands': [{'scale': 2e-5, 'offset': -0.1}]}))
    item.set_self_href(str(tmp_path / 'item.json')); item.make_asset_hrefs_relative(); item.save_object(include_self_link=False)
    scene = open_scene(tmp_path / 'item.json')
    assert scene.band_names == ['BLUE', 'GREEN', 'RED'] and scene.wavelengths == [0.48, 0.56, 0.655]
    px, valid = scene.read()
    np.testing.assert_allclose(px[2][valid], ref[2][valid] * 2e-5 - 0.1, atol=1e-5)
    assert open_scene(tmp_path / 'item.json', bands=['red']).count == 1

def test_bad_inputs(tmp_path, bands):
    with rasterio.open(bands[0]) as s: prof, data = s.profile, s.read()
    with rasterio.open(tmp_path / 'utm22.tif', 'w', **{**prof, 'crs': 'EPSG:32622'}) as d: d.write(data)
    with pytest.raises(ValueError, match='different CRSs'): open_scene([bands[0], tmp_path / 'utm22.tif'])
    with pytest.raises(FileNotFoundError, match='does not exist'): open_scene([bands[0], tmp_path / 'nope_B5.tif'])
    trunc = tmp_path / 'LC08_L1TP_224078_20200518_B5.tif'
    trunc.write_bytes(Path(bands[0]).read_bytes()[:300])
    with pytest.raises(ValueError, match='truncated'): open_scene([bands[0], trunc])
    with rasterio.open(tmp_path / 'x_B04.tif', 'w', **prof) as d: d.write(data)   # no tags, no description
    with pytest.raises(ValueError, match='sensor='): open_scene([tmp_path / 'x_B04.tif'])
    assert open_scene([tmp_path / 'x_B04.tif'], sensor='sentinel-2-l2a').wavelengths == [0.665]
    with pytest.raises(ValueError, match='unknown sensor'): open_scene([tmp_path / 'x_B04.tif'], sensor='sentinel-9')
    with pytest.raises(ValueError, match='twice'): open_scene([bands[0], bands[0]])

def test_embed_geoparquet_duckdb_search(tmp_path, bands, tiny):
    import duckdb, geopandas as gpd, shapely
    from dofaclip.explore import embed_scene
    from dofaclip.embeddings import to_geoparquet, read_vectors, read_metadata, search_geoparquet
    scene = open_scene(bands)
    emb = embed_scene(scene, tiny, tile_size=64, preset='reflectance', cache_dir=tmp_path / 'cache')
    assert emb.embeddings.shape[0] == 9 and emb.embedded.sum() >= 4
    assert embed_scene(open_scene(bands), tiny, tile_size=64, preset='reflectance', cache_dir=tmp_path / 'cache').stats['from_cache']
    path = to_geoparquet(emb, tmp_path / 'emb' / 'scene.parquet')
    gdf = gpd.read_parquet(path)
    assert gdf.crs.to_epsg() == 32621 and len(gdf) == emb.embedded.sum()
    assert gdf.geometry.within(shapely.box(*scene.bounds).buffer(1e-6)).all()
    vec = read_vectors(path)
    assert vec.dtype == np.float32 and vec.shape[1] == tiny.embed_dim
    np.testing.assert_allclose(vec, np.asarray(emb.embeddings[emb.embedded], np.float32))
    assert read_metadata(path)['model_fingerprint'] == emb.meta['fingerprint']
    rows = duckdb.connect().execute(f"SELECT tile, embedding, geometry FROM read_parquet('{path}') ORDER BY tile").fetchall()
    np.testing.assert_allclose(np.array([r[1] for r in rows], np.float32), vec)
    g = rows[-1][2]
    g = shapely.from_wkb(bytes(g)) if isinstance(g, (bytes, bytearray, memoryview)) else shapely.from_wkt(str(g))
    assert g.equals_exact(gdf.geometry.iloc[-1], 1e-6)
    hit = search_geoparquet([path], vec[2], k=2)
    assert hit.loc[0, 'tile'] == gdf.tile.iloc[2] and hit.crs.to_epsg() == 4326
    assert not list(path.parent.glob('*.tmp'))          # written atomically, nothing left over
    # a changed band file is a new cache entry: the fingerprint covers every file of the stack
    with rasterio.open(bands[1], 'r+') as d: d.write(d.read() // 2 + 1)
    again = embed_scene(open_scene(bands), tiny, tile_size=64, preset='reflectance', cache_dir=tmp_path / 'cache')
    assert not again.stats['from_cache']

def _item(key, files, wls, folder):
    import pystac
    with rasterio.open(files[0]) as s: b = transform_bounds(s.crs, 'EPSG:4326', *s.bounds)
    item = pystac.Item(key, geometry=dict(type='Polygon', coordinates=[[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]),
                       bbox=list(b), datetime=datetime.datetime(2020, 5, 18), properties={})
    for f, w in zip(files, wls):
        item.add_asset(Path(f).stem, pystac.Asset(href=str(f), roles=['data'], extra_fields={'eo:bands': [{'name': Path(f).stem, 'center_wavelength': w}]}))
    return item

def test_collection_two_crs_stac_itemcollection(tmp_path, tiny):
    "Two overlapping scenes in different CRSs (one reprojected), given as a STAC ItemCollection: one file per scene, search across both."
    import geopandas as gpd, pystac
    from rasterio.warp import calculate_default_transform, reproject, Resampling
    from dofaclip.embeddings import embed_collection, search_geoparquet, read_vectors, collection_sources
    src = sample_path('landsat8_b234.tif')
    west = split_bands(src, tmp_path / 'west', crop=Window(0, 0, 128, 128), pattern='west_{name}.tif')
    east = split_bands(src, tmp_path / 'east', crop=Window(64, 0, 128, 128), pattern='east_{name}.tif')
    for f in east:
        with rasterio.open(f) as s:
            t, w, h = calculate_default_transform(s.crs, 'EPSG:32721', s.width, s.height, *s.bounds)
            prof, data = {**s.profile, 'crs': 'EPSG:32721', 'transform': t, 'width': w, 'height': h}, s.read(1)
            out = np.zeros((h, w), data.dtype)
            reproject(data, out, src_transform=s.transform, src_crs=s.crs, dst_transform=t, dst_crs='EPSG:32721', dst_nodata=0)
        with rasterio.open(f, 'w', **prof) as d: d.write(out, 1)
    wls = [0.482, 0.5613, 0.6546]
    ic = pystac.ItemCollection([_item('west', west, wls, tmp_path), _item('east', east, wls, tmp_path)])
    ic.save_object(str(tmp_path / 'items.json'))
    assert len(collection_sources(tmp_path / 'items.json')) == 2
    parts = embed_collection(tmp_path / 'items.json', tiny, tmp_path / 'store', tile_size=64, preset='reflectance', cache_dir=tmp_path / 'cache')
    assert [gpd.read_parquet(p).crs.to_epsg() for p in parts] == [32621, 32721]
    east_rows, east_vec = gpd.read_parquet(parts[1]), read_vectors(parts[1])
    i = int(np.flatnonzero((east_rows.row == 1) & (east_rows.col == 1))[0])   # pixels 128..192 of the crop: only the east scene has them
    best = search_geoparquet(parts, east_vec[i], k=3)
    assert (best.loc[0, 'file'], best.loc[0, 'tile']) == (str(parts[1]), east_rows.tile.iloc[i]) and best.crs.to_epsg() == 4326
    same = search_geoparquet(parts, east_vec[int(np.flatnonzero((east_rows.row == 1) & (east_rows.col == 0))[0])], k=2)
    assert sorted(same.scene_id) == ['east', 'west'] and (same.score > 0.999).all()   # the overlap: the same pixels in both scenes
    with pytest.raises(ValueError, match='twice'): collection_sources([west, west])
