"""`python -m dofaclip.train` in real subprocesses: the tiny configs train and write checkpoint, CSV, plot and weights;
`--set` overrides are type-checked and an unknown key is a one-line error (exit 2); a kill (schedule.stop_after) and a
rerun give the same weights as an uninterrupted run; a 2-process torchrun (gloo) run of each recipe matches one process over the same
global batches, and only rank 0 logs and writes."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from conftest import free_port
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
VECT = str(ROOT / 'configs' / 'vect-tiny.json')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
ARTIFACTS = {'checkpoint.pt', 'config.json', 'data', 'history.csv', 'loss_components.png', 'model', 'summary.json'}


def train(*args, launcher=(), timeout=300):
    cmd = [sys.executable, *launcher, '-m', 'dofaclip.train', *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(run):
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def weights(folder: Path) -> dict:
    files = sorted((folder / 'model').glob('*.safetensors'))
    assert files, f"no weights in {folder / 'model'}"
    return load_file(files[0])


def history(folder: Path):
    import pandas as pd
    return pd.read_csv(folder / 'history.csv')




@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "The tiny VECT config: 2 epochs straight; and 2 epochs interrupted after the first, then the same command again."
    tmp = tmp_path_factory.mktemp('train')
    straight = ok(train(VECT, '--set', f'output={tmp / "straight"}', '--set', 'schedule.epochs=2'))
    killed = ok(train(VECT, '--set', f'output={tmp / "killed"}', '--set', 'schedule.epochs=2', '--set', 'schedule.stop_after=1'))
    resumed = ok(train(VECT, '--set', f'output={tmp / "killed"}', '--set', 'schedule.epochs=2'))
    return dict(tmp=tmp, straight=straight, killed=killed, resumed=resumed)


def test_tiny_vect_writes_checkpoint_logs_plot_weights(runs):
    out = runs['tmp'] / 'straight'
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    h = history(out)
    assert list(h['epoch']) == [0, 1]
    assert (h['train_samples_per_s'] > 0).all() and {'train_contrastive', 'valid_loss', 'valid_samples_per_s'} <= set(h)
    assert (out / 'loss_components.png').read_bytes()[:4] == b'\x89PNG'
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['epoch'] == 1
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['finished'] and summary['world_size'] == 1
    assert json.loads((out / 'config.json').read_text())['schedule']['epochs'] == 2   # the resolved config, nested
    assert (out / 'model' / 'open_clip_config.json').is_file()                          # a DOFA-CLIP folder load_pretrained reads
    assert sum(line.startswith('epoch ') for line in runs['straight'].stdout.splitlines()) == 2   # one line per epoch


def test_kill_and_resume_gives_the_same_weights(runs):
    assert 'stopped after 1 of 2 epochs' in runs['killed'].stdout
    assert 'resuming from' in runs['resumed'].stdout
    killed, straight = runs['tmp'] / 'killed', runs['tmp'] / 'straight'
    assert list(history(killed)['epoch']) == [0, 1]                     # the CSV continues, no skipped-epoch rows
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_another_length_needs_resume_force(runs):
    out = runs['tmp'] / 'straight'
    refused = train(VECT, '--set', f'output={out}', '--set', 'schedule.epochs=3')
    assert refused.returncode == 2 and 'resume=force' in refused.stderr
    extended = ok(train(VECT, '--set', f'output={out}', '--set', 'schedule.epochs=3', '--set', 'resume=force'))
    assert 'resuming from' in extended.stdout and 'continuing with epoch 3' in extended.stdout
    assert list(history(out)['epoch']) == [0, 1, 2]


def test_set_overrides_and_config_errors():
    shown = json.loads(ok(train(VECT, '--print-config', '--set', 'optim.lr=1e-4', '--set', 'data.augment=true')).stdout)
    assert shown['optim']['lr'] == 1e-4 and shown['data']['augment'] is True and shown['recipe'] == 'vect'
    for bad, words in ((['--set', 'optim.lrr=1e-4'], ["unknown config key 'optim.lrr'", "'optim.lr'"]),
                       (['--set', 'schedule.epochs=two'], ["'schedule.epochs' must be int"]),
                       (['--set', 'recipe=dino'], ['must be one of'])):
        run = train(VECT, *bad)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), run.stderr
    table = ok(train('--help-config')).stdout
    assert 'optim.lr' in table and 'peak learning rate' in table


def checkpoint_state(folder: Path) -> dict:
    return torch.load(folder / 'checkpoint.pt', map_location='cpu', weights_only=True)['model']


@pytest.mark.parametrize('recipe', ['vect', 'paint', 'align'])
def test_torchrun_two_processes_match_one(tmp_path, recipe):
    "2 gloo processes x batch b == 1 process x batch 2b (the same global batches); rank 0 alone prints and writes."
    config = str(ROOT / 'configs' / f'{recipe}-tiny.json')
    bs = json.loads(Path(config).read_text())['data']['batch_size']
    ddp, single = tmp_path / 'ddp', tmp_path / 'single'
    run = ok(train(config, '--set', f'output={ddp}', launcher=('-m', 'torch.distributed.run', '--nproc-per-node', '2',
                                                              '--master-port', str(free_port()))))
    ok(train(config, '--set', f'output={single}', '--set', f'data.batch_size={2 * bs}'))
    assert {p.name for p in ddp.iterdir()} == ARTIFACTS                     # nothing per rank
    assert sum(line.startswith('epoch 0:') for line in run.stdout.splitlines()) == 1
    assert run.stdout.count(f'dofaclip train: recipe {recipe}, 2 process(es)') == 1
    assert json.loads((ddp / 'summary.json').read_text())['world_size'] == 2
    hd, hs = history(ddp), history(single)
    assert len(hd) == 1
    losses = [c for c in hs.columns if c not in ('epoch', 'time', 'train_loss') and 'samples_per_s' not in c]
    assert 'valid_loss' in losses
    # the logged epoch losses are the whole job's (summed over ranks), not rank 0's share
    for c in losses: assert abs(hd[c][0] - hs[c][0]) < 1e-4 * max(1, abs(hs[c][0])), (c, hd[c][0], hs[c][0])
    a, b = checkpoint_state(single), checkpoint_state(ddp)
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")   # test_ddp's tolerance
    if recipe == 'paint':
        info = json.loads((ddp / 'model' / 'patching.json').read_text())
        assert info['alpha'] in (0.0, 0.5, 1.0) and len(info['sweep']) == 3
        assert 'patching sweep' not in run.stderr                          # no progress bars unless log.progress
    if recipe == 'align': assert (ddp / 'model' / 'student.safetensors').is_file()


def test_dofaclip_train_subcommand():
    "`dofaclip train` (the console script) reaches the same entry point: the config schema, and a config error exits 2."
    import shutil
    exe = shutil.which('dofaclip', path=str(Path(sys.executable).parent))
    res = subprocess.run([exe, 'train', '--help-config'], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and 'optim.lr' in res.stdout, res.stderr
    bad = subprocess.run([exe, 'train', '--set', 'optim.lrr=1'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and 'optim.lr' in bad.stderr and 'Traceback' not in bad.stderr
