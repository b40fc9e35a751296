"""Issue #17, reliability: a table of bad inputs and interruptions, each answered with a clear error that names the
problem and the fix (or a correct result), through the real CLI (`main`, or a subprocess where a process must die or
run beside another) and the API; SIGKILL while outputs are written and while the cache is built leaves the previous
good state intact. One tiny checkpoint serves the whole module."""
import json, os, re, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio

from dofaclip.io import sample_path
from dofaclip.cli import main, DEMO_TEMPLATE, DEMO_LABELS

LANDSAT = sample_path('landsat8_b234.tif')
WL = '0.49,0.56,0.665'


def cli_cmd():
    exe = shutil.which('dofaclip', path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, '-c', 'import sys; from dofaclip.cli import main; sys.exit(main())']


def cli_env(cache):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DOFACLIP_CACHE': str(cache), 'PYTHONUNBUFFERED': '1'}
    env.pop('DOFACLIP_QUIET', None)
    return env


def dofaclip_cli(*args, cache):
    return subprocess.run(cli_cmd() + [str(a) for a in args], capture_output=True, text=True, env=cli_env(cache), timeout=300)


def write_tif(path, data, dtype='uint16', crs='EPSG:32621', nodata=None, tags=None):
    data = np.asarray(data)
    with rasterio.open(path, 'w', driver='GTiff', width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=dtype,
                       crs=crs, nodata=nodata, transform=rasterio.transform.from_origin(500000, 7200000, 30, 30)) as dst:
        dst.write(data.astype(dtype)); dst.update_tags(**(tags or {}))
    return path


@pytest.fixture(scope='module')
def ctx(tmp_path_factory):
    "One tiny DOFA-CLIP checkpoint, its model, and the bad files of the table (written once)."
    from dofaclip.testing import tiny_checkpoint
    from dofaclip.weights import load_pretrained
    root = tmp_path_factory.mktemp('reliability')
    ckpt = tiny_checkpoint(root / 'tiny', name='dofaclip-tiny')
    rng = np.random.default_rng(0)
    afile = root / 'afile'; afile.write_text('not a folder')
    broken = root / 'broken.tif'; shutil.copy(LANDSAT, broken)
    data = bytearray(broken.read_bytes()); data[len(data) // 2:len(data) // 2 + 20000] = b'U' * 20000; broken.write_bytes(bytes(data))
    garbage = root / 'garbage.bin'; garbage.write_bytes(os.urandom(4096))
    (root / 'text.tif').write_text('this is not a GeoTIFF')
    return SimpleNamespace(
        root=root, ckpt=ckpt, model=load_pretrained(ckpt), afile=afile, broken=broken, garbage=garbage, text=root / 'text.tif',
        dn16=write_tif(root / 'dn16.tif', rng.integers(6000, 9000, (3, 96, 96))),
        s2=write_tif(root / 'sentinel2_b432.tif', rng.integers(500, 3000, (3, 96, 96))),
        nocrs=write_tif(root / 'nocrs.tif', np.ones((3, 32, 32)), crs=None),
        empty=write_tif(root / 'empty.tif', np.zeros((3, 96, 96)), nodata=0, tags=dict(product='L1TP', sensor='Landsat-8 OLI')),
        small=write_tif(root / 'small.tif', np.full((3, 40, 50), 7000), tags=dict(product='L1TP', sensor='Landsat-8 OLI')))


def run_main(capsys, *argv):
    "Exit status and stderr of the real CLI entry point, in-process."
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# (id, argv builder, exit status, what the one error line must say)
CLI_CASES = [
    ('top-k 0', lambda c: ['--top-k', 0], 2, 'not a positive whole number'),
    ('tile-size negative', lambda c: ['--tile-size', -5], 2, 'not a positive whole number'),
    ('stride 0', lambda c: ['--stride', 0], 2, 'not a positive whole number'),
    ('batch-size 0', lambda c: ['--batch-size', 0], 2, 'not a positive whole number'),
    ('preset foo', lambda c: ['--preset', 'foo'], 2, "'foo' is not a scaling: use one of auto, uint8, reflectance"),
    ('preset reversed range', lambda c: ['--preset', '9000,6000'], 2, 'LOW < HIGH'),
    ('template without {}', lambda c: ['--template', 'a satellite image'], 2, "exactly one"),
    ('template with two {}', lambda c: ['--template', '{} and {}'], 2, "has 2 '{}' placeholders"),
    ('duplicate wavelengths', lambda c: ['--wavelengths', '0.49,0.49,0.665'], 2, '0.49 more than once'),
    ('one class', lambda c: ['--classes', 'water'], 2, 'repeat --classes'),
    ('out is a file', lambda c: ['--out', c.afile], 1, 'is a file, not a folder'),
    ('out below a file', lambda c: ['--out', c.afile / 'sub'], 1, 'no folder can be made there'),
    ('stride above tile size', lambda c: ['--tile-size', 64, '--stride', 128], 1, 'pass --stride <= --tile-size'),
    ('tile larger than scene', lambda c: ['--tile-size', 4096], 1, 'of 1024x1024 px is smaller than one tile of 4096 px'),
    ('min-valid above 1', lambda c: ['--min-valid', 1.5], 1, 'fraction in 0..1'),
    ('workers negative', lambda c: ['--workers', -1], 1, '0 or more'),
    ('nanometres', lambda c: ['--wavelengths', '490,560,665'], 1, 'pass micrometres'),
    ('missing model', lambda c: ['--model', c.root / 'no-such-model'], 1, 'is not a folder, an hf-hub'),
    ('open_clip arch, DOFA-CLIP folder', lambda c: ['--model', f'open_clip:ViT-B-32:{c.ckpt}'], 1, 'is a DOFA-CLIP checkpoint'),
    ('open_clip arch, DOFA-CLIP file', lambda c: ['--model', f'open_clip:ViT-B-32:{c.ckpt}/open_clip_model.safetensors'], 1,
     '(without open_clip:)'),
    ('open_clip arch, garbage weights', lambda c: ['--model', f'open_clip:ViT-B-32:{c.garbage}'], 1, "do not fit open_clip's ViT-B-32"),
    ('open_clip unknown arch', lambda c: ['--model', 'open_clip:NoSuchArch'], 1, 'unknown open_clip architecture'),
    ('tokenizer for a BPE model', lambda c: ['--tokenizer', c.root], 1, 'drop --tokenizer'),
    ('bad device', lambda c: ['--device', 'no-such-device'], 1, ''),
]


@pytest.mark.parametrize('name,extra,code,says', CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_arguments(name, extra, code, says, ctx, capsys):
    "Each bad argument: the expected exit status, one `dofaclip: error:` line saying what to fix, no traceback, nothing written."
    out = ctx.root / f'out-{re.sub(r"[^a-z0-9]+", "-", name)}'
    argv = ['explore', LANDSAT, 'water', '--model', ctx.ckpt, '--out', out, '--cache-dir', ctx.root / 'cache', '-q', *extra(ctx)]
    got, err = run_main(capsys, *argv)
    assert got == code, err
    assert 'Traceback' not in err and says in err, err
    lines = [l for l in err.splitlines() if l.startswith('dofaclip')]
    assert len(lines) == 1 and re.match(r'dofaclip( \w+)?: error: ', lines[0]), err
    assert not out.exists() or not any(out.iterdir())


# (id, scene builder, extra argv, what the error says)
SCENE_CASES = [
    ('damaged GeoTIFF', lambda c: c.broken, ['--tile-size', 64], 'The file is damaged'),
    ('not a raster', lambda c: c.text, [], 'as a raster'),
    ('missing file', lambda c: c.root / 'missing.tif', [], 'no such raster'),
    ('no CRS', lambda c: c.nocrs, ['--wavelengths', WL], 'has no CRS'),
    ('16-bit without product tags', lambda c: c.dn16, ['--wavelengths', WL], 'cannot tell how to scale its pixels'),
    ('Sentinel-2 without baseline', lambda c: c.s2, ['--wavelengths', WL], 'processing baseline is unknown'),
    ('all nodata', lambda c: c.empty, ['--wavelengths', WL, '--tile-size', 32], 'every tile of'),
    ('scene smaller than a tile', lambda c: c.small, ['--wavelengths', WL], 'of 40x50 px is smaller than one tile of 64 px'),
    ('wavelength count', lambda c: LANDSAT, ['--wavelengths', '0.49,0.56'], '3 bands but 2 wavelengths'),
]


@pytest.mark.parametrize('name,scene,extra,says', SCENE_CASES, ids=[c[0] for c in SCENE_CASES])
def test_cli_bad_scenes(name, scene, extra, says, ctx, capsys):
    path = scene(ctx)
    got, err = run_main(capsys, 'explore', path, 'water', '--model', ctx.ckpt, '--out', ctx.root / 'o-scene',
                        '--cache-dir', ctx.root / 'cache', '-q', *extra)
    assert got == 1 and 'Traceback' not in err and says in err, err
    assert str(Path(path).name) in err or name in ('wavelength count', 'Sentinel-2 without baseline'), err   # names the file
    assert not (ctx.root / 'o-scene').exists()


def test_cli_names_the_fix_for_unscaled_data(ctx, capsys):
    "The scaling error lists the presets to choose from, and the named choice then works."
    got, err = run_main(capsys, 'explore', ctx.dn16, 'water', '--model', ctx.ckpt, '--wavelengths', WL, '--out', ctx.root / 'o-dn',
                        '--cache-dir', ctx.root / 'cache', '-q', '--tile-size', 32, '--no-html')
    assert got == 1 and all(p in err for p in ('--preset NAME', 'landsat8_l1 (', 'sentinel2_offset (', 'LOW,HIGH')), err
    got, err = run_main(capsys, 'explore', ctx.dn16, 'water', '--model', ctx.ckpt, '--wavelengths', WL, '--out', ctx.root / 'o-dn',
                        '--cache-dir', ctx.root / 'cache', '-q', '--tile-size', 32, '--no-html', '--preset', 'landsat8_l1')
    assert got == 0, err
    assert json.loads((ctx.root / 'o-dn' / 'summary.json').read_text())['scaling']['why'] == 'given'


def test_existing_outputs_refused(ctx, capsys):
    out = ctx.root / 'o-exist'; out.mkdir(); (out / 'heatmap_water.tif').write_text('earlier run')
    got, err = run_main(capsys, 'explore', LANDSAT, 'water', '--model', ctx.ckpt, '--out', out, '-q')
    assert got == 1 and 'pass --overwrite' in err and (out / 'heatmap_water.tif').read_text() == 'earlier run'


# API: (id, call, exception type, what it says)
def _api_cases():
    from dofaclip.explore import embed_scene, SceneExplorer
    from dofaclip.cli import run_explore
    from dofaclip.pretrain import resume_checkpoint
    return [
        ('embed tile_size 0', lambda c: embed_scene(LANDSAT, c.model, tile_size=0), '--tile-size'),
        ('embed batch_size -1', lambda c: embed_scene(LANDSAT, c.model, batch_size=-1), '--batch-size'),
        ('embed stride float', lambda c: embed_scene(LANDSAT, c.model, stride=2.5), 'stride must be a positive whole number'),
        ('embed preset unknown', lambda c: embed_scene(LANDSAT, c.model, preset='foo'), 'unknown scaling preset'),
        ('embed preset reversed', lambda c: embed_scene(LANDSAT, c.model, preset=(9, 1)), 'LOW < HIGH'),
        ('explorer stride 0', lambda c: SceneExplorer(c.model, LANDSAT, stride=0), '--stride'),
        ('explorer min_valid', lambda c: SceneExplorer(c.model, LANDSAT, min_valid=2), '0..1'),
        ('run_explore top_k 0', lambda c: run_explore(LANDSAT, ['water'], c.model, 'm', out=c.root / 'o-api', top_k=0), '--top-k'),
        ('run_explore template', lambda c: run_explore(LANDSAT, ['water'], c.model, 'm', out=c.root / 'o-api', template='x'),
         'exactly one'),
        ('run_explore out file', lambda c: run_explore(LANDSAT, ['water'], c.model, 'm', out=c.afile), 'is a file, not a folder'),
        ('resume missing', lambda c: resume_checkpoint(SimpleNamespace(), c.root / 'none.pth'), 'no checkpoint at'),
        ('resume truncated', lambda c: resume_checkpoint(SimpleNamespace(), c.garbage), 'delete it to start over'),
    ]


@pytest.mark.parametrize('i', range(12))
def test_api_bad_arguments(i, ctx):
    name, call, says = _api_cases()[i]
    with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError)) as e: call(ctx)
    assert says in str(e.value), (name, str(e.value))


def test_long_query_warns(ctx):
    from dofaclip.explore import SceneExplorer
    ex = SceneExplorer(ctx.model, LANDSAT, device='cpu')
    with pytest.warns(UserWarning, match="longer than the model's context of 32 tokens"): ex.text_features('a lake ' * 50)
    with warnings.catch_warnings(): warnings.simplefilter('error'); ex.text_features('a lake')   # a short one does not warn


# --- caches --------------------------------------------------------------------------------------------------------

def _embed(ctx, cache, **kw):
    from dofaclip.explore import embed_scene
    from dofaclip.core import set_quiet
    set_quiet(True)
    try: return embed_scene(LANDSAT, ctx.model, tile_size=256, cache_dir=cache, device='cpu', **kw)
    finally: set_quiet(None)


@pytest.mark.parametrize('damage', ['truncate', 'zero', 'bad-meta', 'flags-zeroed', 'no-checksum'])
def test_damaged_cache_is_rebuilt(damage, ctx, tmp_path):
    first = _embed(ctx, tmp_path)
    ref, folder = np.array(first.embeddings, np.float32), first.path
    del first
    emb, flags, meta = folder / 'embeddings.npy', folder / 'embedded.npy', folder / 'meta.json'
    if damage == 'truncate': os.truncate(emb, emb.stat().st_size // 3)
    if damage == 'zero': emb.write_bytes(bytes(emb.stat().st_size))
    if damage == 'bad-meta': meta.write_text('{"n_tiles": ')
    if damage == 'flags-zeroed': np.save(flags, np.zeros(len(ref), bool))
    if damage == 'no-checksum': m = json.loads(meta.read_text()); m.pop('sha256'); meta.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match=re.escape(str(folder)) + '.*damaged'): again = _embed(ctx, tmp_path)
    assert again.stats['from_cache'] is False and again.path == folder
    np.testing.assert_allclose(np.asarray(again.embeddings, np.float32), ref, atol=2e-3)
    assert _embed(ctx, tmp_path).stats['from_cache'] is True                 # the rebuilt entry is trusted again


def test_cache_key_sees_content_not_only_size_and_mtime(ctx, tmp_path):
    "A scene rewritten in place with other pixels, the same size and the same modification time, is embedded again."
    from dofaclip.explore import embed_scene
    with rasterio.open(LANDSAT) as src: profile, pixels, tags = src.profile, src.read(), src.tags()
    profile.update(compress=None, tiled=False); profile.pop('blockxsize', None); profile.pop('blockysize', None)
    scene = tmp_path / 'scene.tif'
    def write(data):
        with rasterio.open(scene, 'w', **profile) as dst: dst.write(data); dst.update_tags(**tags)
    write(pixels)
    first = embed_scene(scene, ctx.model, tile_size=256, cache_dir=tmp_path / 'c', device='cpu', wavelengths=[0.482, 0.5613, 0.6546])
    st = scene.stat()
    write(np.where(pixels > 0, pixels + 500, 0).astype(pixels.dtype))          # uncompressed: the size stays
    os.utime(scene, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert scene.stat().st_size == st.st_size and scene.stat().st_mtime_ns == st.st_mtime_ns
    second = embed_scene(scene, ctx.model, tile_size=256, cache_dir=tmp_path / 'c', device='cpu', wavelengths=[0.482, 0.5613, 0.6546])
    assert second.stats['from_cache'] is False and second.path != first.path


def test_stale_tmp_cleaned_and_readonly_cache(ctx, tmp_path):
    dead = subprocess.Popen(['true']); dead.wait()
    stale = tmp_path / f'0123abcd.tmp-{dead.pid}'; stale.mkdir(); (stale / 'embeddings.npy').write_bytes(b'half')
    _embed(ctx, tmp_path)
    assert not stale.exists() and not list(tmp_path.glob('*.tmp-*'))
    blocked = ctx.afile / 'cache'                  # below a file: not writable, even for root
    with pytest.warns(UserWarning, match='not writable.*embedding without a cache'): e = _embed(ctx, blocked)
    assert e.path is None and e.embedded.any()


def test_concurrent_writers_of_one_entry(ctx, tmp_path):
    "Two processes embed the same scene into one cache at once: both succeed, one complete entry, no temporary left."
    args = ['explore', LANDSAT, 'water', '--model', ctx.ckpt, '--tile-size', 256, '--no-html', '-q', '--cache-dir', tmp_path / 'c']
    procs = [subprocess.Popen(cli_cmd() + [str(a) for a in args + ['--out', tmp_path / f'o{i}']], env=cli_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    entries = list((tmp_path / 'c').iterdir())
    assert len(entries) == 1 and (entries[0] / 'meta.json').exists(), entries


# --- scaling read from the data ------------------------------------------------------------------------------------

def test_auto_scaling_of_bundled_landsat_matches_demo(ctx, tmp_path):
    "The bundled Level-1 scene with --preset auto gives the demo's class map (its explicit MODALITY_RANGES scaling)."
    demo = dofaclip_cli('demo', '--query', 'water', '--model', ctx.ckpt, '--out', tmp_path / 'demo', '--no-html', '-q',
                        '--tile-size', 128, '--stride', 64, cache=tmp_path / 'cache-demo')   # coarser than the demo's 64/32: faster
    assert demo.returncode == 0, demo.stderr
    common = [*[a for label in DEMO_LABELS for a in ('--classes', label)], '--template', DEMO_TEMPLATE,
              '--tile-size', 128, '--stride', 64, '--min-valid', 0.9, '--model', ctx.ckpt, '--no-html', '-q']
    auto = dofaclip_cli('explore', LANDSAT, 'water', *common, '--out', tmp_path / 'auto', cache=tmp_path / 'cache-auto')
    assert auto.returncode == 0, auto.stderr
    assert 'scaling: landsat8_l1 6000..8700 -> [0, 1]' in auto.stdout and 'Landsat Level-1' in auto.stdout   # printed
    with rasterio.open(tmp_path / 'demo' / 'classes.tif') as a, rasterio.open(tmp_path / 'auto' / 'classes.tif') as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))                             # the same class map
        np.testing.assert_allclose(a.read(2), b.read(2), atol=1e-6)                     # and probabilities
        assert json.loads(b.tags()['scaling'])['preset'] == 'landsat8_l1'                # recorded in the GeoTIFF
    summary = json.loads((tmp_path / 'auto' / 'summary.json').read_text())
    assert summary['scaling']['range'] == [6000.0, 8700.0] and summary['scaling']['why'].startswith('Landsat Level-1')
    # the old guess (reflectance x 10^4) feeds the model other numbers: the probabilities differ
    refl = dofaclip_cli('explore', LANDSAT, 'water', *common, '--preset', 'reflectance', '--out', tmp_path / 'refl',
                        cache=tmp_path / 'cache-auto')
    assert refl.returncode == 0, refl.stderr
    with rasterio.open(tmp_path / 'auto' / 'classes.tif') as a, rasterio.open(tmp_path / 'refl' / 'classes.tif') as b:
        assert not np.allclose(np.nan_to_num(a.read(2)), np.nan_to_num(b.read(2)), atol=1e-4)


# --- SIGKILL -------------------------------------------------------------------------------------------------------

def _kill_when(proc, stream, pattern, timeout=120):
    "Read `stream` of `proc` until `pattern` shows (tqdm's \\r updates included), then SIGKILL it; what was read."
    fd, seen, t0 = stream.fileno(), b'', time.time()
    os.set_blocking(fd, False)
    while time.time() - t0 < timeout:
        try: chunk = os.read(fd, 65536)
        except BlockingIOError: chunk = None
        if chunk: seen += chunk
        if re.search(pattern, seen): proc.send_signal(signal.SIGKILL); proc.wait(); return seen.decode(errors='replace')
        if chunk == b'' or proc.poll() is not None: break
        time.sleep(0.02)
    proc.kill(); proc.wait()
    raise AssertionError(f"never saw {pattern!r}: {seen[-2000:]!r}")


def test_sigkill_while_building_cache_leaves_no_trusted_half(ctx, tmp_path):
    args = ['explore', LANDSAT, 'water', '--model', ctx.ckpt, '--tile-size', 64, '--stride', 32, '--batch-size', 4,
            '--no-html', '--cache-dir', tmp_path / 'c', '--out', tmp_path / 'o']
    proc = subprocess.Popen(cli_cmd() + [str(a) for a in args], env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _kill_when(proc, proc.stderr, rb'embedding landsat8_b234\.tif:\s+\d+%\|.*?\| *[1-9]\d*/')   # after the first progress
    left = list((tmp_path / 'c').iterdir())
    assert left and all('.tmp-' in p.name for p in left), left                # only a temporary folder, never an entry
    assert not (tmp_path / 'o').exists() or not (tmp_path / 'o' / 'summary.json').exists()
    res = dofaclip_cli(*args[:-2], '--out', tmp_path / 'o2', '-q', cache=tmp_path)
    assert res.returncode == 0 and 'read from cache' not in res.stdout, res.stderr   # embedded afresh
    assert [p for p in (tmp_path / 'c').iterdir() if '.tmp-' in p.name] == []         # the dead run's folder is gone


def test_sigkill_while_writing_outputs_keeps_the_old_run(ctx, tmp_path):
    out, cache = tmp_path / 'out', tmp_path / 'c'
    base = ['explore', LANDSAT, 'water', 'a town', 'fields', 'a forest', '--model', ctx.ckpt, '--tile-size', 256, '--cache-dir', cache,
            '--out', out, '-q']
    assert dofaclip_cli(*base, cache=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(cli_cmd() + [str(a) for a in base + ['--overwrite', '--negative', 'clouds']], env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _kill_when(proc, proc.stdout, rb"query 'water'")                        # the first query's files are written, in staging
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith('.')} == before   # the old run, intact
    assert json.loads((out / 'summary.json').read_text())['queries'][0]['kind'] == 'similarity'
    res = dofaclip_cli(*base, '--overwrite', '--negative', 'clouds', cache=tmp_path)           # the next run finishes ...
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith('.')] == []                    # ... and clears the killed staging
    assert json.loads((out / 'summary.json').read_text())['queries'][0]['kind'] == 'probability'
