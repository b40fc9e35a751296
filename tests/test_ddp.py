"""DDP on CPU (gloo, 2 processes): a few VECT steps give the same weights as one process on the same global batches,
for the CLIP-style model (open_clip ClipLoss, features gathered across ranks) and the SigLIP one (SigLipLoss, text
features passed round the ranks by its neighbour exchange)."""
import csv, os, random, zlib
from pathlib import Path
import numpy as np
import pytest
from conftest import free_port
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault('OMP_NUM_THREADS', '1')
PER_RANK_BS, WORLD, EPOCHS = 2, 2, 2
MODELS = ('dofaclip-tiny', 'dofaclip-tiny-siglip')


def _subset_manifest(out_dir: Path, n_train: int = 4, n_valid: int = 2) -> Path:
    "The first training and validation rows of each modality of the demo set: one global batch per wavelength set and epoch."
    from dofaclip.demo import build_demo_set
    manifest = build_demo_set(out_dir / 'demo')
    rows = list(csv.DictReader(open(manifest)))
    keep, counts = [], {}
    for r in rows:
        key = (r['modality'], r['split'])
        if counts.get(key, 0) < (n_train if r['split'] == 'train' else n_valid):
            keep.append(r); counts[key] = counts.get(key, 0) + 1
    subset = manifest.with_name('subset.csv')
    with open(subset, 'w', newline='') as f:
        w = csv.DictWriter(f, list(rows[0])); w.writeheader(); w.writerows(keep)
    return subset


class WordHashTokenizer:
    "Deterministic token ids from caption words (the SigLIP sentencepiece model is not on disk here; the loss only needs ids)."
    def __init__(self, context_length: int, vocab_size: int = 32000): self.context_length, self.vocab_size = context_length, vocab_size
    def __call__(self, captions):
        out = torch.zeros(len(captions), self.context_length, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in c.split()][:self.context_length]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def _train(manifest, model_name: str, rank: int, world_size: int, bs: int) -> tuple:
    from dofaclip.model import create_model, get_tokenizer
    from dofaclip.teachers import tiny_teachers
    from dofaclip.data import image_text_dls
    from dofaclip.pretrain import vect_learner
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    teachers = tiny_teachers()
    model = create_model(model_name)
    siglip = model.logit_bias is not None
    tokenizer = WordHashTokenizer(model.context_length) if siglip else get_tokenizer(model)
    dls = image_text_dls(manifest, tokenizer, size=64, bs=bs, augment=False, seed=0, rank=rank, world_size=world_size)
    learn = vect_learner(dls, model, teachers=teachers, rank=rank, world_size=world_size, lock_text=False)
    kind = type(learn.loss_func.vect.contrastive).__name__
    with learn.no_bar(), learn.no_logging(): learn.fit(EPOCHS, 1e-3)
    state = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    return dict(state=state, n_batches=len(dls.train), loss=kind, last=float(learn.loss_func.last['contrastive']))


def _worker(rank, manifest, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    try:
        runs = {name: _train(manifest, name, rank, WORLD, PER_RANK_BS) for name in MODELS}
        if rank == 0: torch.save(runs, out)
    finally:
        dist.destroy_process_group()




@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Both models trained once in 2 gloo processes (one spawn) and once in this process with the global batch."
    tmp = tmp_path_factory.mktemp('ddp')
    manifest = _subset_manifest(tmp)
    out = tmp / 'ddp_state.pt'
    mp.spawn(_worker, args=(str(manifest), free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out), {name: _train(manifest, name, 0, 1, PER_RANK_BS * WORLD) for name in MODELS}


@pytest.mark.parametrize('model_name,loss', [('dofaclip-tiny', 'ClipLoss'), ('dofaclip-tiny-siglip', 'SigLipLoss')])
def test_ddp_matches_single_process(runs, model_name, loss):
    ddp, single = runs[0][model_name], runs[1][model_name]
    assert ddp['loss'] == single['loss'] == loss                       # the contrastive loss under test
    assert ddp['n_batches'] == single['n_batches'] >= 2                # the same number of (global) steps
    assert np.isfinite(single['last'])
    # atol: a fifth of one AdamW step at vect_learner's lr 5e-4; eps 1e-6 (open_clip's) amplifies float rounding of the
    # near-zero gradients of rare token rows to ~2e-5, while a missing gradient sync moves weights by whole steps
    for k, v in single['state'].items():
        torch.testing.assert_close(ddp['state'][k], v, rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")
    # training moved the weights (the comparison is not between two untouched models), the text tower included
    from dofaclip.model import create_model
    from dofaclip.teachers import tiny_teachers
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    tiny_teachers(); fresh = create_model(model_name).state_dict()
    moved = [k for k, v in fresh.items() if not torch.allclose(v, single['state']['clip.' + k])]
    assert len(moved) > 10, moved
    assert any(k.startswith('text.') for k in moved) and 'logit_scale' in moved, moved
    if loss == 'SigLipLoss': assert 'logit_bias' in moved
