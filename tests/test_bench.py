"The benchmark entry point runs end to end on tiny configurations and writes complete, sane results (not a speed test)."
import json, math, os, subprocess, sys

FIELDS = ('batch', 'throughput', 'median_ms', 'peak_mem_gb', 'gflops_per_sample', 'mfu')


def test_bench_entry_point_writes_every_field(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DOFACLIP_CACHE': str(tmp_path / 'cache')}
    res = subprocess.run([sys.executable, '-m', 'dofaclip.bench', '--preset', 'tiny', '--out', str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / 'results.json').read_text())
    assert result['meta']['peak_tflops'] > 0 and result['meta']['preset'] == 'tiny'
    configs = [r['config'] for r in result['rows']]
    # every section of the suite is there: vision towers (ours and timm's), projections, VECT steps, exploration
    for part in ('timm', '202 bands', 'conv', 'matmul', 'online', 'cached', 'embed', 'text query',
                 'stack', 'per-band files', 'search exact', 'search FAISS'):
        assert any(part in c for c in configs), (part, configs)
    for row in result['rows']:
        # I/O and search rows do no model arithmetic: their FLOPs/MFU are None (shown as '-'); every other field is a number
        not_applicable = {'gflops_per_sample', 'mfu'} if row['config'].startswith(('stack', 'search')) else set()
        for k in FIELDS:
            if k in not_applicable and row[k] is None: continue
            assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)
    ratio = next(r['ratio'] for r in result['rows'] if 'per-band files' in r['config'])
    assert math.isfinite(ratio) and ratio > 0
    assert all(0 <= r['recall'] <= 1 for r in result['rows'] if 'FAISS' in r['config'])
    table = (tmp_path / 'results.md').read_text()
    assert table.count('\n| ') == len(result['rows']) + 1   # header + one line per configuration
