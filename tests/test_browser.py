"""Real front ends in a real browser (headless Chromium: Debian's `chromium` + `chromium-driver`, `make browser`):

- the standalone HTML map, opened from a local file, draws the heat-map overlay over the scene's footprint (#6);
- the `ExploreMap` widget in JupyterLab and in Voila (both from PyPI, each server started here on 127.0.0.1 with a
  free port, no token and a temporary notebook folder, and stopped here): the first view shows the scene, a query
  typed and searched (button, then Enter) paints a heat map with its colour bar, the class map shows its legend,
  the opacity slider fades the overlay, a click on a tile lists its labels, and the widget survives a page reload
  (#12). Screenshots of each step go to `.pytest_cache/screens/` (or `$DOFACLIP_SCREENS`)."""
import io, json, os, shutil, socket, subprocess, sys, tempfile, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from dofaclip.io import sample_path
from dofaclip.model import create_model
from dofaclip.explore import SceneExplorer
from dofaclip.mapview import MapState, save_html

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--window-size=1280,1000', '--hide-scrollbars']


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


# ---------------------------------------------------------------- the widget in JupyterLab and Voila (issue #12)
SCREENS = Path(os.environ.get('DOFACLIP_SCREENS', Path(__file__).resolve().parent.parent / '.pytest_cache' / 'screens'))
QUERY_BOX = 'input[placeholder="query, e.g. water"]'

NOTEBOOK_CELLS = [
    "import os, torch\n"
    "from dofaclip.core import set_quiet\n"
    "from dofaclip.io import sample_path\n"
    "from dofaclip.model import create_model\n"
    "from dofaclip.explore import SceneExplorer\n"
    "from dofaclip.mapview import MapState\n"
    "from dofaclip.widget import ExploreMap\n"
    "set_quiet(); torch.manual_seed(0); torch.set_num_threads(1)",
    "ex = SceneExplorer(create_model('dofaclip-tiny'), sample_path('landsat8_b234.tif'), tile_size=128, stride=64,\n"
    "                   cache_dir=os.environ['DOFACLIP_TEST_CACHE'], device='cpu')\n"
    "emap = ExploreMap(MapState(ex, max_size=512, labels=['water', 'forest', 'bare soil', 'a city']), height='500px')\n"
    "emap",
]


def write_notebook(folder: Path) -> Path:
    cells = [dict(cell_type='code', execution_count=None, metadata={}, outputs=[], source=c) for c in NOTEBOOK_CELLS]
    nb = dict(cells=cells, nbformat=4, nbformat_minor=5, metadata=dict(
        kernelspec=dict(name='python3', display_name='Python 3', language='python'), language_info=dict(name='python')))
    path = folder / 'map.ipynb'; path.write_text(json.dumps(nb)); return path




class Server:
    "A Jupyter server (JupyterLab or Voila) on 127.0.0.1 in `folder`, token off, its settings in temp folders."
    def __init__(self, args, folder: Path, path='/'):
        self.port, self.folder = free_port(), folder
        env = dict(os.environ, OMP_NUM_THREADS='1', JUPYTER_CONFIG_DIR=str(folder / '.cfg'), JUPYTER_RUNTIME_DIR=str(folder / '.run'),
                   JUPYTER_PLATFORM_DIRS='1', DOFACLIP_TEST_CACHE=str(folder / '.cache'), IPYTHONDIR=str(folder / '.ipython'))
        self.log = open(folder / f'server-{self.port}.log', 'w')
        self.proc = subprocess.Popen([sys.executable, '-m', *args, f'--port={self.port}', '--no-browser'], cwd=folder, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f'http://127.0.0.1:{self.port}{path}'
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None: break
            try: socket.create_connection(('127.0.0.1', self.port), timeout=1).close(); return
            except OSError: time.sleep(0.5)
        self.stop(); pytest.fail(f"{args[0:2]} did not start: {(folder / f'server-{self.port}.log').read_text()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.log.close()


def wait_for(driver, script, timeout=90, what=''):
    "Poll a JavaScript expression until it is truthy; fail with the page's console log."
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script('try { return ' + script + ' } catch (e) { return null }')
        if value: return value
        time.sleep(0.25)
    shot(driver, 'timeout-' + (what or 'wait').replace(' ', '-'))
    raise AssertionError(f"timed out waiting for {what or script}; browser log: {driver.get_log('browser')[-5:]}")


def shot(driver, name) -> np.ndarray:
    SCREENS.mkdir(parents=True, exist_ok=True)
    png = driver.get_screenshot_as_png(); (SCREENS / f'{name}.png').write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)


# the widget's parts, found by what a user sees (the map is the first leaflet container on the page)
JS = """
window.dc = {
  map: () => document.querySelector('.leaflet-container'),
  images: () => Array.from(document.querySelectorAll('.leaflet-container img.leaflet-image-layer')),
  legend: () => (document.querySelector('.dofaclip-legend') || {}).innerText || '',
  info: () => Array.from(document.querySelectorAll('.widget-html-content')).map(e => e.innerText).join('\\n'),
  rect: e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; },
  loaded: () => dc.images().length > 0 && dc.images().every(i => i.complete && i.naturalWidth > 0),
};
"""


def parts(driver):
    if not driver.execute_script('return !!window.dc'): driver.execute_script(JS)


def crop(img, rect, ratio):
    l, t, r, b = (round(v * ratio) for v in rect)
    return img[max(t, 0):b, max(l, 0):r]


def check_first_view(driver, name):
    "The first view shows the scene: its overlay lies inside the map and fills most of it along one axis."
    parts(driver)
    wait_for(driver, 'dc.map() && dc.loaded()', what='the scene overlay')
    driver.execute_script("dc.map().scrollIntoView({block: 'center'})")
    time.sleep(1)
    m, o = driver.execute_script('return [dc.rect(dc.map()), dc.rect(dc.images()[0])]')
    img = shot(driver, f'{name}-1-first-view')
    assert m[2] - m[0] > 300 and m[3] - m[1] > 300, f"the map is too small: {m}"
    assert o[0] >= m[0] - 2 and o[1] >= m[1] - 2 and o[2] <= m[2] + 2 and o[3] <= m[3] + 2, f"scene {o} not within map {m}"
    fill = max((o[2] - o[0]) / (m[2] - m[0]), (o[3] - o[1]) / (m[3] - m[1]))
    assert fill > 0.6, f"the scene fills only {fill:.0%} of the map"
    ratio = img.shape[1] / driver.execute_script('return window.innerWidth')
    assert crop(img, o, ratio).std() > 10, "the scene overlay is blank"      # a picture, not an empty box
    return ratio


def search(driver, text, enter=False):
    "Type `text` into the query box (fast, as a user) and press Enter or click Search; wait for its heat map."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.CSS_SELECTOR, QUERY_BOX)
    box.click(); box.send_keys(Keys.CONTROL, 'a'); box.send_keys(Keys.DELETE)
    if enter: box.send_keys(text + Keys.ENTER)
    else:
        box.send_keys(text)
        driver.find_element(By.XPATH, "//button[normalize-space()='Search']").click()
    wait_for(driver, f'dc.images().length > 1 && dc.loaded() && dc.legend().split("\\n")[0].startsWith({json.dumps(text)})',
             what=f'the heat map of {text!r}')
    legend = driver.execute_script('return dc.legend()')
    assert legend.split('\n')[0].strip().startswith(text + ' ('), legend          # the whole text, not a prefix
    assert driver.execute_script("return !!document.querySelector('.dofaclip-colorbar')"), "no colour bar"


def overlay_pixels(driver, name, ratio):
    time.sleep(0.7)   # the image is decoded and painted
    o = driver.execute_script('return dc.rect(dc.images()[0])')
    return crop(shot(driver, name), o, ratio)


def differs(a, b, tol=3.0):
    return np.abs(a - b).mean() > tol


def user_session(driver, name, full=True):
    "What a user does with the widget, asserting what the screen shows after each step."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.action_chains import ActionChains
    ratio = check_first_view(driver, name)
    before = overlay_pixels(driver, f'{name}-1-first-view', ratio)
    search(driver, 'water')
    heat1 = overlay_pixels(driver, f'{name}-2-search-water', ratio)
    assert differs(before, heat1), "the heat map did not change the picture"
    src1 = driver.execute_script('return dc.images()[1].src')
    search(driver, 'bare soil', enter=True)
    wait_for(driver, f'dc.images()[1].src !== {json.dumps(src1)}', what='a new heat map after Enter')
    heat2 = overlay_pixels(driver, f'{name}-3-enter-bare-soil', ratio)
    assert differs(heat1, heat2, 0.5), "Enter did not change the heat map"
    driver.find_element(By.XPATH, "//button[normalize-space()='classes']").click()
    wait_for(driver, 'dc.legend().startsWith("classes") && dc.loaded()', what='the class legend')
    legend = driver.execute_script('return dc.legend()')
    assert all(w in legend for w in ('water', 'forest', 'bare soil', 'a city')), legend
    classes = overlay_pixels(driver, f'{name}-4-classes', ratio)
    assert differs(heat2, classes), "the class map did not change the picture"
    if not full: return
    handle = driver.execute_script("""return Array.from(document.querySelectorAll('.widget-slider')).find(
        s => s.innerText.includes('Opacity')).querySelector('.noUi-handle')""")
    ActionChains(driver).drag_and_drop_by_offset(handle, -120, 0).perform()
    wait_for(driver, '+getComputedStyle(dc.images()[1]).opacity < 0.5', what='the overlay to fade')
    faint = overlay_pixels(driver, f'{name}-5-opacity', ratio)
    assert differs(classes, faint), "the opacity slider did not change the picture"
    # a point on the scene that no control covers
    x, y, m = driver.execute_script("""const o = dc.rect(dc.images()[0]), m = dc.rect(dc.map());
        for (const fy of [0.5, 0.7, 0.3, 0.85]) for (const fx of [0.3, 0.5, 0.2, 0.7]) {
            const x = o[0] + fx * (o[2] - o[0]), y = o[1] + fy * (o[3] - o[1]), e = document.elementFromPoint(x, y);
            if (e && e.closest('.leaflet-container') && !e.closest('.leaflet-control')) return [x, y, m]; }
        return null;""") or pytest.fail('every point of the scene is covered by controls')
    ActionChains(driver).move_to_element_with_offset(driver.find_element(By.CSS_SELECTOR, '.leaflet-container'),
        round(x - (m[0] + m[2]) / 2), round(y - (m[1] + m[3]) / 2)).click().perform()
    wait_for(driver, '/tile \\d+ at/.test(dc.info())', what='the labels of the clicked tile')
    assert driver.execute_script("return document.querySelectorAll('.leaflet-container path.leaflet-interactive').length") > 0
    shot(driver, f'{name}-6-click')


@pytest.fixture(scope='module')
def notebook_dir():
    folder = Path(tempfile.mkdtemp(prefix='dofaclip-browser-'))
    write_notebook(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_widget_in_jupyterlab(browser, notebook_dir):
    settings = notebook_dir / '.settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True, exist_ok=True)   # no "news?" toast over the page (and no request for news)
    (settings / 'notification.jupyterlab-settings').write_text(json.dumps(dict(fetchNews='false', checkForUpdates=False)))
    server = Server(['jupyter', 'lab', '--ServerApp.ip=127.0.0.1', "--IdentityProvider.token=", '--ServerApp.password=',
                     f'--ServerApp.root_dir={notebook_dir}', '--LabApp.expose_app_in_browser=True',
                     '--LabApp.news_url=None', '--LabApp.extension_manager=readonly', '--allow-root', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
                     f'--LabApp.workspaces_dir={notebook_dir / ".ws"}', f'--LabApp.user_settings_dir={notebook_dir / ".settings"}'],
                    notebook_dir, '/lab/tree/map.ipynb')
    try:
        browser.get(server.url)
        ready = ("window.jupyterapp && jupyterapp.shell.currentWidget && jupyterapp.shell.currentWidget.sessionContext"
                 " && jupyterapp.shell.currentWidget.sessionContext.session && jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                 " && jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'")
        wait_for(browser, ready, 120, 'the notebook and its kernel')
        browser.execute_script("jupyterapp.commands.execute('notebook:run-all-cells')")
        user_session(browser, 'jupyterlab')
        browser.execute_script("jupyterapp.commands.execute('docmanager:save')")
        wait_for(browser, "!jupyterapp.shell.currentWidget.context.model.dirty", 30, 'the notebook saved')
        browser.refresh()
        wait_for(browser, ready, 120, 'the notebook after reload')
        check_first_view(browser, 'jupyterlab-7-reload')     # the widget is restored from the kernel, not "Loading widget..."
        assert 'Loading widget' not in browser.execute_script('return document.body.innerText')
    finally:
        server.stop()


def test_widget_in_voila(browser, notebook_dir):
    server = Server(['voila', 'map.ipynb', '--Voila.ip=127.0.0.1'], notebook_dir)
    try:
        browser.get(server.url)
        user_session(browser, 'voila', full=False)
        browser.refresh()                                     # a new kernel runs the notebook again
        check_first_view(browser, 'voila-5-reload')
        assert 'Loading widget' not in browser.execute_script('return document.body.innerText')
    finally:
        server.stop()
