"""A scene larger than the test's memory budget is embedded tile by tile, never read whole (issue #6)."""
import os, tracemalloc
os.environ.setdefault('OMP_NUM_THREADS', '1')

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from dofaclip.io import Scene, open_scene
from dofaclip.model import create_model
from dofaclip.explore import embed_scene

SIZE, BANDS = 4096, 3          # 4096 x 4096 x 3 uint16 = 96 MiB decoded, ~1 MiB on disk
BUDGET = 24 * 2**20            # peak traced (numpy/Python) memory allowed while embedding
TILE = 256


def write_large_scene(path):
    "A tiled, deflate-compressed GeoTIFF written block row by block row (never whole in memory), nodata 0 in one corner."
    profile = dict(driver='GTiff', width=SIZE, height=SIZE, count=BANDS, dtype='uint16', nodata=0, crs='EPSG:32633',
                   transform=from_origin(500000, 5000000, 10, 10), tiled=True, blockxsize=256, blockysize=256, compress='deflate')
    yy, xx = np.mgrid[0:256, 0:SIZE]
    with rasterio.open(path, 'w', **profile) as dst:
        for b in range(BANDS): dst.update_tags(b + 1, wavelength=str([0.49, 0.56, 0.665][b]))
        for r in range(0, SIZE, 256):
            block = (1000 + (xx + r + yy) % 3000 + 500 * np.arange(BANDS)[:, None, None]).astype(np.uint16)
            if r < 512: block[:, :, :512] = 0   # a nodata corner: 2 x 2 tiles, skipped
            dst.write(block, window=Window(0, r, SIZE, 256))
    return path


def test_large_scene_is_streamed(tmp_path, monkeypatch):
    path = write_large_scene(tmp_path / 'large.tif')
    decoded = SIZE * SIZE * BANDS * 2
    assert decoded > 3 * BUDGET and path.stat().st_size < BUDGET / 4
    reads, overviews = [], []
    real_read = Scene.read
    def counting_read(self, window=None, out_shape=None):   # a spy around the real read
        if out_shape is None: reads.append(window)
        else: overviews.append(out_shape)                   # decimated look at the scene (pixel-scaling check)
        return real_read(self, window, out_shape)
    monkeypatch.setattr(Scene, 'read', counting_read)

    model = create_model('dofaclip-tiny')
    scene = open_scene(path)
    tracemalloc.start()
    try:
        emb = embed_scene(scene, model, tile_size=TILE, batch_size=8, cache_dir=tmp_path / 'cache', preset='reflectance')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    n_tiles = (SIZE // TILE) ** 2
    assert len(emb) == n_tiles
    assert len(reads) == n_tiles                                   # one windowed read per tile ...
    assert all(w is not None and w.width * w.height == TILE * TILE for w in reads)   # ... never the whole scene
    assert all(h * w <= 256 * 256 for h, w in overviews)          # at most a small decimated overview
    assert emb.stats['tiles_skipped'] == 4 and emb.stats['tiles_embedded'] == n_tiles - 4
    assert peak < BUDGET, f"peak traced memory {peak / 2**20:.1f} MiB exceeds the {BUDGET / 2**20:.0f} MiB budget"
    # the embeddings live on disk (memory-mapped), not in RAM
    assert isinstance(emb.embeddings, np.memmap)
