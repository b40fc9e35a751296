"""WebDataset shards in training (issue 15): a 2-process gloo VECT run (torchrun's environment, `run_training`) on tiny shards
written here, with the teachers' features read from next to the samples, killed after one epoch and resumed, ends
with the weights of one uninterrupted process over the same global batches; the teacher cache built over 2 gloo ranks
equals the single-process one; a failed shard write leaves nothing a reader trusts."""
import json, os
from pathlib import Path
import numpy as np
import pytest
from conftest import free_port
import torch
import torch.multiprocessing as mp

os.environ.setdefault('OMP_NUM_THREADS', '1')
ROOT = Path(__file__).resolve().parents[1]
VECT_TINY = ROOT / 'configs' / 'vect-tiny.json'


def _tiny_manifest(folder: Path, n_train: int = 4, n_valid: int = 2) -> Path:
    "n_train + n_valid real 64 px tiles of each of two bundled rasters (3-band Landsat-8, 4-band RGBN) and their manifest."
    from dofaclip.io import open_scene, sample_path, tile_grid, read_tile
    (folder / 'tiles').mkdir(parents=True, exist_ok=True); rows = []
    for fname, modality in (('landsat8_b234.tif', 'landsat8_l1'), ('rgbn_5m_20160101.tif', 'uint8')):
        scene = open_scene(sample_path(fname))
        wl = ' '.join(f'{w:g}' for w in scene.wavelengths)
        for k, tile in enumerate(tile_grid(scene, size=64)[:n_train + n_valid]):
            np.save(folder / 'tiles' / f'{modality}_{k}.npy', read_tile(scene, tile)[0])
            rows.append(f"tiles/{modality}_{k}.npy,{modality} tile number {k},{wl},{modality},{'valid' if k >= n_train else 'train'}\n")
    (folder / 'manifest.csv').write_text('image,caption,wavelengths,modality,split\n' + ''.join(rows))
    return folder / 'manifest.csv'


def _config(out: Path, shards: Path, **overrides) -> dict:
    from dofaclip.config import load_config
    sets = {'output': str(out), 'prepare': '', 'data.shards': str(shards), 'teachers.from_shards': 'true', 'schedule.epochs': '2',
            'log.plot': 'false', 'log.tensorboard': 'off',   # logs are test_train's subject; here only weights and data order
            **{k: str(v) for k, v in overrides.items()}}
    return load_config(VECT_TINY, [f'{k}={v}' for k, v in sets.items()])


def _worker(rank, world, ports, shards, manifest, out):
    "One rank, with the environment torchrun gives it: the sharded teacher cache, then a VECT run killed after 1 epoch, then resumed."
    import torch.distributed as dist
    from dofaclip.core import set_quiet
    from dofaclip.data import read_manifest, ImageTextDataset
    from dofaclip.teachers import build_teacher_cache, tiny_teachers
    from dofaclip.train import run_training
    set_quiet(True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1')
    os.environ['MASTER_PORT'] = str(ports[0])
    dist.init_process_group('gloo', rank=rank, world_size=world)
    ds = ImageTextDataset(read_manifest(manifest), lambda c: torch.zeros(len(c), 1, dtype=torch.long), size=64)
    torch.manual_seed(0)
    build_teacher_cache(ds, tiny_teachers(), Path(out) / 'cache-sharded', bs=3, shard_size=4, rank=rank, world_size=world)
    dist.destroy_process_group()
    os.environ['MASTER_PORT'] = str(ports[1])
    run_training(_config(Path(out) / 'ddp', Path(shards), **{'schedule.stop_after': 1}))      # "killed" after epoch 1
    os.environ['MASTER_PORT'] = str(ports[2])
    run_training(_config(Path(out) / 'ddp', Path(shards)))                                    # the same command again


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from dofaclip.shards import write_shards, write_teacher_shards
    from dofaclip.teachers import tiny_teachers
    from dofaclip.train import run_training
    from dofaclip.core import set_quiet
    tmp = tmp_path_factory.mktemp('shards')
    manifest = _tiny_manifest(tmp / 'demo')
    shards = write_shards(manifest, tmp / 'shards', shard_size=3)
    torch.manual_seed(0)
    write_teacher_shards(shards, tiny_teachers(), size=64, bs=4)
    mp.spawn(_worker, args=(2, [free_port() for _ in range(3)], str(shards), str(manifest), str(tmp)), nprocs=2, join=True)
    set_quiet(True)
    single = run_training(_config(tmp / 'single', shards, **{'data.batch_size': 4}))   # one process, the global batch
    return dict(tmp=tmp, shards=shards, manifest=manifest, single=single)


def _state(folder: Path) -> dict:
    return torch.load(folder / 'checkpoint.pt', map_location='cpu', weights_only=True)


def test_two_ranks_killed_and_resumed_match_one_process(runs):
    ddp, single = _state(runs['tmp'] / 'ddp'), _state(runs['tmp'] / 'single')
    assert ddp['epoch'] == single['epoch'] == 1 and runs['single']['train_batches_per_epoch'] == 2   # 2 global batches an epoch
    summary = json.loads((runs['tmp'] / 'ddp' / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['finished']
    import pandas as pd
    assert list(pd.read_csv(runs['tmp'] / 'ddp' / 'history.csv')['epoch']) == [0, 1]   # epoch 0 before the kill, 1 after
    a, b = single['model'], ddp['model']
    assert a.keys() == b.keys() and any(k.startswith('clip.translators') for k in a)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")   # test_ddp's tolerance
    from dofaclip.model import create_model
    fresh = create_model('dofaclip-tiny').state_dict()
    assert sum(not torch.allclose(v, a['clip.' + k]) for k, v in fresh.items()) > 10         # training moved the weights


def test_sharded_teacher_cache_equals_single_process(runs):
    from dofaclip.data import read_manifest, ImageTextDataset
    from dofaclip.teachers import build_teacher_cache, tiny_teachers, TeacherCache
    ds = ImageTextDataset(read_manifest(runs['manifest']), lambda c: torch.zeros(len(c), 1, dtype=torch.long), size=64)
    torch.manual_seed(0)
    single = build_teacher_cache(ds, tiny_teachers(), runs['tmp'] / 'cache-single', bs=3, shard_size=4)
    sharded = TeacherCache(runs['tmp'] / 'cache-sharded')
    assert not list((runs['tmp'] / 'cache-sharded').glob('part-*'))                           # merged, parts removed
    meta = lambda c: json.loads((c.folder / 'index.json').read_text())
    assert meta(sharded) == meta(single) and len(single) == 12
    for name in single.teachers:
        for a, b in zip(single.shards[name], sharded.shards[name]): np.testing.assert_array_equal(a, b)


def test_shards_feed_the_loader_and_a_failed_write_leaves_nothing(runs, monkeypatch):
    import dofaclip.shards as shards
    records = shards.shard_records(runs['shards'])
    assert len(records) == 12 and {r['modality'] for r in records} == {'landsat8_l1', 'uint8'}
    original, calls = shards.encode_image, []
    def failing(image, dtype='uint8'):   # the disk fills up after 4 samples
        calls.append(1)
        if len(calls) > 4: raise OSError('disk full')
        return original(image, dtype)
    monkeypatch.setattr(shards, 'encode_image', failing)
    out = runs['tmp'] / 'broken'
    with pytest.raises(OSError, match='disk full'): shards.write_shards(runs['manifest'], out, shard_size=2)
    assert not out.exists()                                                                    # no folder a reader could open
    with pytest.raises(FileNotFoundError): shards.shard_records(out)
    monkeypatch.setattr(shards, 'encode_image', original)
    assert len(shards.shard_records(shards.write_shards(runs['manifest'], out, shard_size=2))) == 12   # the retry completes
    assert not list(out.parent.glob('.broken.tmp-*'))                                          # and leaves no staging behind
