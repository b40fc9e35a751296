"""The project's test command (called by `make test`).

1. the exported package is in sync with the notebooks (`nbdev-export` changes nothing);
2. the notebooks are clean (`nbdev-clean` changes nothing);
3. the tutorials carry their outputs (so they read online; `make tutorials` re-executes and saves them), and those
   outputs are recent enough to match the code: `make tutorials` records in each tutorial's metadata a fingerprint of
   its code cells and of every dofaclip module it imports (transitively, read with `ast`); a tutorial whose
   fingerprint differs from the code's is stale;
4. every notebook runs (`nbdev-test`, one process per notebook, in parallel);
5. `pytest tests/`: a skipped test fails the run (except a CUDA-only test on a machine without a GPU), and so does
   a run that collects no tests.

Ends with one line `N passed, N failed` over checks, notebooks and pytest tests.
Extra flags for nbdev-test (e.g. `slow cuda`) come from the environment variable TEST_FLAGS.
"""
import ast, hashlib, json, os, re, subprocess, sys, time, xml.etree.ElementTree as ET
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


PACKAGE = 'dofaclip'
STAMP_KEY = 'dofaclip'   # the tutorial notebooks' metadata key (kept by nbdev-clean: `allowed_metadata_keys` in pyproject)


def code_cells(nb) -> list:
    return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']


def lazy_names(pkg_dir: Path) -> dict:
    "name -> module for the names the package's __init__.py imports on first use (its `_EXPORTS` table)."
    init = pkg_dir / '__init__.py'
    for node in ast.parse(init.read_text()).body if init.exists() else []:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '_EXPORTS' for t in node.targets):
            return {name: mod for mod, names in ast.literal_eval(node.value).items() for name in names}
    return {}


def imported_modules(source: str, pkg_dir: Path, inside: bool = False) -> set:
    "Modules of the package (names like 'io'; '__init__' for the package) that `source` imports, in functions too."
    try: tree = ast.parse(source)
    except SyntaxError:   # notebook magics and shell lines: drop them and try again
        tree = ast.parse('\n'.join(l for l in source.splitlines() if not l.lstrip().startswith(('%', '!'))))
    lazy, found = lazy_names(pkg_dir), set()
    def from_package(names):   # `from dofaclip import io, create_model`: a submodule, or a lazy name of __init__
        return {'__init__'} | {n if (pkg_dir / f'{n}.py').exists() else lazy.get(n) for n in names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split('.')
                if parts[0] != PACKAGE: continue
                if len(parts) > 1: found.add(parts[1])
                else: found |= {'__init__'} if inside else {'__init__', *lazy.values()}   # a tutorial may use any lazy name
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0 and node.module:
                parts = node.module.split('.')
                if parts[0] != PACKAGE: continue
                found |= {parts[1]} if len(parts) > 1 else from_package(names)
            elif node.level and inside:   # relative imports inside the package
                found |= {node.module.split('.')[0]} if node.module else from_package(names)
    return {m for m in found if m and (pkg_dir / f'{m}.py').exists()}


def tutorial_fingerprint(nb_path, pkg_dir=ROOT / PACKAGE) -> dict:
    "{'code': hash of the code cells, 'modules': {module: hash of its file}} for every package module the tutorial needs."
    nb = json.loads(Path(nb_path).read_text())
    code = '\n'.join(code_cells(nb))
    todo, seen = list(imported_modules(code, pkg_dir)), set()
    while todo:
        mod = todo.pop()
        if mod in seen: continue
        seen.add(mod)
        todo += imported_modules((pkg_dir / f'{mod}.py').read_text(), pkg_dir, inside=True) - seen
    sha = lambda b: hashlib.sha256(b).hexdigest()[:16]
    dotted = lambda m: PACKAGE if m == '__init__' else f'{PACKAGE}.{m}'   # nbdev-clean drops metadata keys like '__init__'
    return dict(code=sha(code.encode()), modules={dotted(m): sha((pkg_dir / f'{m}.py').read_bytes()) for m in sorted(seen)})


def stamp_tutorial(nb_path, pkg_dir=ROOT / PACKAGE):
    "Record the tutorial's fingerprint in its metadata (what `make tutorials` does after re-executing it)."
    nb = json.loads(Path(nb_path).read_text())
    nb.setdefault('metadata', {})[STAMP_KEY] = dict(fingerprint=tutorial_fingerprint(nb_path, pkg_dir))
    Path(nb_path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')


def tutorial_staleness(nb_path, pkg_dir=ROOT / PACKAGE) -> str:
    "Why the tutorial's saved outputs may not match the code (what changed since `make tutorials`), or '' when they do."
    saved = json.loads(Path(nb_path).read_text()).get('metadata', {}).get(STAMP_KEY, {}).get('fingerprint')
    if not saved: return 'no fingerprint recorded'
    now = tutorial_fingerprint(nb_path, pkg_dir)
    changed = (['its code cells'] if saved.get('code') != now['code'] else []) + \
              [m for m in sorted(set(now['modules']) | set(saved.get('modules', {})))
               if now['modules'].get(m) != saved.get('modules', {}).get(m)]
    return 'changed since its outputs were saved: ' + ', '.join(changed) if changed else ''


def stale_message(nb_path, pkg_dir=ROOT / PACKAGE) -> str:
    "The test command's failure line for a stale tutorial, or '' when it is fresh."
    why = tutorial_staleness(nb_path, pkg_dir)
    return f'tutorial {Path(nb_path).name} is stale: run `make tutorials` ({why})' if why else ''


def main():
    if sys.argv[1:2] == ['--stamp-tutorials']:   # `make tutorials`, after re-executing them
        for nb in sys.argv[2:] or sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb')): stamp_tutorial(nb)
        return 0
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
        stale = stale_message(nb)
        check(f'tutorial {nb.name} is recent enough to match the code', not stale, f'  {stale}')

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
