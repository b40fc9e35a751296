"""The project's test command (called by `make test`).

1. the exported package is in sync with the notebooks (`nbdev-export` changes nothing);
2. the notebooks are clean (`nbdev-clean` changes nothing);
3. the tutorials carry their outputs (so they read online; `make tutorials` re-executes and saves them);
4. every notebook runs (`nbdev-test`, one process per notebook, in parallel);
5. `pytest tests/`: a skipped test fails the run (except a CUDA-only test on a machine without a GPU), and so does
   a run that collects no tests.

Ends with one line `N passed, N failed` over checks, notebooks and pytest tests.
Extra flags for nbdev-test (e.g. `slow cuda`) come from the environment variable TEST_FLAGS.
"""
import hashlib, json, os, subprocess, sys, time, xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cuda_available() -> bool:
    res = subprocess.run([sys.executable, '-c', 'import torch; print(torch.cuda.is_available())'], capture_output=True, text=True)
    return res.stdout.strip() == 'True'


def digest(paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def unchanged_after(cmd, paths_fn):
    "Run `cmd`; return the files it created, changed or removed."
    before = digest(paths_fn())
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    after = digest(paths_fn())
    return sorted(str(p.relative_to(ROOT)) for p in set(before) | set(after) if before.get(p) != after.get(p))


def notebooks():
    return sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(ROOT / 'nbs').parts))


def run_notebook(nb):
    flags = os.environ.get('TEST_FLAGS', '').split()
    cmd = [str(BIN / 'nbdev-test'), str(nb), '--do-print'] + (['--flags', ' '.join(flags)] if flags else [])
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    return nb, res.returncode == 0, time.time() - start, res.stdout + res.stderr


def tutorial_outputs_missing(nb_path) -> str:
    "Why a tutorial does not read well online (too few cells with outputs, no picture), or '' when it does."
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    with_out = sum(bool(c.get('outputs')) for c in code)
    images = sum(k.startswith('image/') for c in code for o in c.get('outputs', []) for k in o.get('data', {}))
    images += sum(bool(c.get('attachments')) for c in nb['cells'])
    if with_out < len(code) / 2: return f'only {with_out} of {len(code)} code cells carry outputs'
    if not images: return 'no plot, map or picture among its outputs'
    return ''


def main():
    passed, failed = 0, []

    def check(name, ok, detail=''):
        nonlocal passed
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"\n{detail}" if detail and not ok else ''), flush=True)
        if ok: passed += 1
        else: failed.append(name)

    changed = unchanged_after([str(BIN / 'nbdev-export')], lambda: list((ROOT / 'dofaclip').rglob('*.py')))
    check('package in sync with notebooks (nbdev-export)', not changed,
          '  changed by nbdev-export: ' + ', '.join(changed) + '\n  run `make export` and commit')
    changed = unchanged_after([str(BIN / 'nbdev-clean')], notebooks)
    check('notebooks clean (nbdev-clean)', not changed,
          '  changed by nbdev-clean: ' + ', '.join(changed) + '\n  run `make clean-nbs` and commit')

    for nb in sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb')):
        why = tutorial_outputs_missing(nb)
        check(f'tutorial {nb.name} carries its outputs', not why, f'  {why}: run `make tutorials` and commit')

    workers = int(os.environ.get('TEST_WORKERS', os.cpu_count() or 1))
    # the longest notebooks first so the parallel run ends sooner
    nbs = sorted(notebooks(), key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(workers) as pool:
        for nb, ok, secs, out in pool.map(run_notebook, nbs):
            check(f'notebook {nb.relative_to(ROOT)} ({secs:.0f}s)', ok, out[-6000:])

    junit = ROOT / '.pytest_cache' / 'junit.xml'
    junit.parent.mkdir(exist_ok=True)
    junit.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, '-m', 'pytest', 'tests', '-q', f'--junitxml={junit}'], cwd=ROOT)
    if res.returncode == 5: check('pytest collected tests', False, '  pytest collected no tests from tests/')
    elif junit.exists():
        for case in ET.parse(junit).getroot().iter('testcase'):
            name = f"pytest {case.get('classname')}::{case.get('name')}"
            bad = case.find('failure') is not None or case.find('error') is not None
            skipped = case.find('skipped')
            if skipped is None: check(name, not bad)
            else:   # a skip is a failure unless it only waits for a GPU this machine lacks
                why = skipped.get('message') or ''
                if 'CUDA' in why and not cuda_available(): print(f'SKIP  {name}: {why}')
                else: check(name, False, f'  skipped: {why}')
    if res.returncode not in (0, 5) and not junit.exists(): check('pytest run', False, f'exit code {res.returncode}')

    if failed: print('\nFailed:\n  ' + '\n  '.join(failed))
    print(f'\n{passed} passed, {len(failed)} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
