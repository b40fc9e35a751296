"""A real browser: the standalone HTML map, opened from a local file in headless Chromium (Debian's `chromium` +
`chromium-driver`; `make browser` installs them), draws the heat-map overlay over the scene's footprint (issue #6)."""
import io, os, shutil, tempfile
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dofaclip.io import sample_path
from dofaclip.model import create_model
from dofaclip.explore import SceneExplorer
from dofaclip.mapview import MapState, save_html

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--window-size=1000,800', '--hide-scrollbars']


@pytest.fixture(scope='module')
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Chromium is missing: install Debian's chromium and chromium-driver (`make browser`)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions(); opts.binary_location = CHROMIUM
    for f in FLAGS: opts.add_argument(f)
    profile = tempfile.mkdtemp()
    opts.add_argument(f'--user-data-dir={profile}')
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit(); shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert('RGB')).astype(int)


def test_html_map_shows_overlay_in_footprint(tmp_path, browser):
    explorer = SceneExplorer(create_model('dofaclip-tiny'), sample_path('landsat8_b234.tif'), tile_size=128, stride=64,
                             cache_dir=tmp_path / 'cache')
    state = MapState(explorer, max_size=512)
    page = save_html(state, tmp_path / 'map.html', results=[explorer.query('water')])
    html = page.read_text()
    assert '<script src=' not in html and '<link ' not in html        # everything inline, nothing fetched

    browser.get(page.as_uri())
    assert browser.execute_script('return !!(window.L && window.dofaclip && window.dofaclip.map)'), browser.get_log('browser')
    # only the heat-map overlay: hide the scene image so the pixels that remain are the overlay's
    browser.execute_script('dofaclip.map.removeLayer(dofaclip.scene)')
    assert browser.execute_script('return dofaclip.map.hasLayer(dofaclip.overlays["water"])')
    box = browser.execute_script("""
        var m = dofaclip.map, b = dofaclip.bounds;
        var sw = m.latLngToContainerPoint(b[0]), ne = m.latLngToContainerPoint(b[1]);
        var r = m.getContainer().getBoundingClientRect();
        var controls = Array.from(document.querySelectorAll('.leaflet-control, #panel')).map(function(e) {
            var c = e.getBoundingClientRect(); return [c.left, c.top, c.right, c.bottom]; });
        return {x0: sw.x + r.left, y0: ne.y + r.top, x1: ne.x + r.left, y1: sw.y + r.top, controls: controls};""")
    img = screenshot(browser)
    h, w, _ = img.shape
    ratio = w / browser.execute_script('return window.innerWidth')     # device pixels per CSS pixel
    x0, y0, x1, y1 = (round(box[k] * ratio) for k in ('x0', 'y0', 'x1', 'y1'))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and (x1 - x0) > 200, box

    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx >= x0 + 10) & (xx < x1 - 10) & (yy >= y0 + 10) & (yy < y1 - 10)
    outside = (xx < x0 - 5) | (xx >= x1 + 5) | (yy < y0 - 5) | (yy >= y1 + 5)
    for l, t, r, b in box['controls']:   # the panel and Leaflet's controls are not map content
        ctrl = (xx >= l * ratio - 2) & (xx < r * ratio + 2) & (yy >= t * ratio - 2) & (yy < b * ratio + 2)
        inside &= ~ctrl; outside &= ~ctrl
    assert inside.sum() > 10_000 and outside.sum() > 10_000
    painted = (np.abs(img - 255).sum(-1) > 30)           # the map background is white
    assert painted[inside].mean() > 0.5, f"overlay covers only {painted[inside].mean():.0%} of the footprint"
    assert painted[outside].mean() < 0.01, f"{painted[outside].mean():.0%} of the map outside the footprint is painted"
    # and the heat map's colours differ from place to place (it is data, not a flat fill)
    assert img[inside & painted].std(0).max() > 10

    # the opacity slider changes the overlay layer
    browser.execute_script("var s = document.getElementById('opacity'); s.value = 0.1; s.dispatchEvent(new Event('input'));")
    assert abs(browser.execute_script('return dofaclip.overlays["water"].image.options.opacity') - 0.1) < 1e-9
    faint = screenshot(browser)
    assert np.abs(faint - 255).sum(-1)[inside].mean() < np.abs(img - 255).sum(-1)[inside].mean()
