"""DDP on CPU (gloo, 2 processes): a few VECT steps give the same weights as one process on the same global batches."""
import csv, os, random, socket
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault('OMP_NUM_THREADS', '1')
PER_RANK_BS, WORLD = 2, 2


def _subset_manifest(out_dir: Path, n_rows: int = 24) -> Path:
    "The first rows of each modality of the demo set: a few global batches per epoch, fast on CPU."
    from dofaclip.data import build_demo_set
    manifest = build_demo_set(out_dir / 'demo')
    rows = list(csv.DictReader(open(manifest)))
    by_modality = {}
    for r in rows: by_modality.setdefault(r['modality'], []).append(r)
    keep = [r for group in by_modality.values() for r in group[:n_rows // len(by_modality)]]
    subset = manifest.with_name('subset.csv')
    with open(subset, 'w', newline='') as f:
        w = csv.DictWriter(f, list(rows[0])); w.writeheader(); w.writerows(keep)
    return subset


def _train(manifest, rank: int, world_size: int, bs: int) -> tuple:
    from dofaclip.model import create_model, get_tokenizer
    from dofaclip.teachers import tiny_teachers
    from dofaclip.data import image_text_dls
    from dofaclip.pretrain import vect_learner
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    teachers = tiny_teachers()
    model = create_model('dofaclip-tiny')
    dls = image_text_dls(manifest, get_tokenizer(model), size=64, bs=bs, augment=False, seed=0, rank=rank, world_size=world_size)
    learn = vect_learner(dls, model, teachers=teachers, rank=rank, world_size=world_size, lock_text=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}, len(dls.train)


def _worker(rank, manifest, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    try:
        state, n_batches = _train(manifest, rank, WORLD, PER_RANK_BS)
        if rank == 0: torch.save(dict(state=state, n_batches=n_batches), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    manifest = _subset_manifest(tmp_path)
    out = tmp_path / 'ddp_state.pt'
    mp.spawn(_worker, args=(str(manifest), _free_port(), str(out)), nprocs=WORLD, join=True)
    ddp = torch.load(out)
    single, n_single = _train(manifest, 0, 1, PER_RANK_BS * WORLD)
    assert ddp['n_batches'] == n_single >= 2            # the same number of (global) steps
    for k, v in single.items():
        torch.testing.assert_close(ddp['state'][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # training moved the weights (the comparison is not between two untouched models)
    from dofaclip.model import create_model
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    from dofaclip.teachers import tiny_teachers
    tiny_teachers(); fresh = create_model('dofaclip-tiny').state_dict()
    moved = [k for k, v in fresh.items() if not torch.allclose(v, single['clip.' + k])]
    assert len(moved) > 10, moved
