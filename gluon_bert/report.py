"""The main job: pretrain -> fine-tune -> evaluate -> a short report beside the book's numbers."""
from __future__ import annotations

import datetime
import json
import os
import platform

__all__ = ['reproduce', 'BOOK', 'REPRODUCE_RECIPES']

# Settings of the main job. 'sample' fits the shipped sample and a 2-core machine in a few
# minutes; 'book' is the book's experiment on the real data (WikiText-2 + SNLI).
REPRODUCE_RECIPES = {
    'sample': dict(
        pretrain=dict(preset='d2l.pretrain', batch_size=128, max_len=64, lr=1e-3,
                      num_steps=300, log_interval=25),
        finetune=dict(batch_size=64, max_len=64, lr=5e-4, num_epochs=5, pad_to='longest',
                      bucket=True),
    ),
    'book': dict(
        pretrain=dict(preset='d2l.pretrain', batch_size=512, max_len=64, lr=0.01,
                      num_steps=50, log_interval=10),
        finetune=dict(batch_size=512, max_len=128, lr=1e-4, num_epochs=5),
    ),
}

# The book's MXNet numbers (2 GPUs): pretraining 50 steps, fine-tuning bert.small 5 epochs.
BOOK = dict(mlm=7.292, nsp=0.822, pairs_per_sec=2417, finetune_loss=0.477,
            test_acc=0.789, examples_per_sec=4652)


def _snli_setup(snli_dir):
    """Train on the train split when there is one; else hold out 1000 dev pairs (the
    shared experiment data has only SNLI dev)."""
    from .data.snli import read_snli
    try:
        read_snli(snli_dir, 'train')
        return dict(train_split='train', eval_split='test'), None
    except FileNotFoundError:
        return (dict(train_split='dev', eval_split='dev', holdout=1000),
                'no SNLI train split here: trained on SNLI dev minus 1,000 seeded held-out '
                'pairs, evaluated on those 1,000')


def _data_dirs(data_dir, download):
    """(wikitext-2 folder, SNLI folder, description); (None, None, ...) for the sample."""
    if download:
        from .data.download import download_extract
        return (download_extract('wikitext-2'), download_extract('SNLI'),
                'official WikiText-2 + SNLI (downloaded)')
    if data_dir:
        return os.path.join(data_dir, 'wikitext-2'), os.path.join(data_dir, 'snli'), data_dir
    return None, None, 'shipped sample'


def reproduce(data_dir=None, out_dir='runs/reproduce', recipe=None, devices=None, seed=0,
              pretrain_steps=None, finetune_epochs=None, progress=None, download=False):
    """The main job on the shipped sample, on `data_dir` (holding wikitext-2/ and snli/),
    or with `download` on the official files fetched into the cache."""
    from .config import TrainConfig
    from .train import finetune, pretrain
    wiki_dir, snli_dir, data_name = _data_dirs(data_dir, download)
    recipe = recipe or ('book' if wiki_dir else 'sample')
    settings = REPRODUCE_RECIPES[recipe]
    notes = []
    # pretrain (continues a half-finished run in out_dir)
    pre_cfg = TrainConfig.for_task('pretrain', data_dir=wiki_dir, seed=seed, devices=devices,
                                   out_dir=os.path.join(out_dir, 'pretrain'),
                                   **dict(settings['pretrain'], num_steps=pretrain_steps or
                                          settings['pretrain']['num_steps']))
    pre = pretrain(pre_cfg, resume=True, progress=progress)
    # fine-tune from it, then evaluate on the held-out split
    split, note = _snli_setup(snli_dir) if snli_dir else ({}, None)
    if note:
        notes.append(note)
    ft_settings = dict(settings['finetune'], **split)
    if finetune_epochs:
        ft_settings['num_epochs'] = finetune_epochs
    ft_cfg = TrainConfig.for_task('finetune', data_dir=snli_dir, seed=seed, devices=devices,
                                  init=pre_cfg.out_dir, out_dir=os.path.join(out_dir, 'finetune'),
                                  **ft_settings)
    ft = finetune(ft_cfg, resume=True, progress=progress)
    # report
    summary = dict(
        recipe=recipe, data=data_name, devices=pre['devices'],
        date=datetime.date.today().isoformat(), machine=platform.platform(),
        pretrain=dict(steps=pre['step'], mlm=pre['mlm_avg'], nsp=pre['nsp_avg'],
                      mlm_last=pre['mlm'], nsp_last=pre['nsp'],
                      pairs_per_sec=pre['pairs_per_sec'], vocab_size=pre['vocab_size'],
                      config=pre_cfg.to_dict()),
        finetune=dict(loss=ft['loss'], train_acc=ft['train_acc'], eval_acc=ft['eval_acc'],
                      examples_per_sec=ft['examples_per_sec'], config=ft_cfg.to_dict()),
        book=BOOK, notes=notes)
    with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=2, default=str)
    text = _markdown(summary)
    with open(os.path.join(out_dir, 'REPORT.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    return dict(summary, report_text=text)


def _fmt(x, digits=3):
    return '-' if x is None else f'{x:.{digits}f}'


def _markdown(s):
    p, f, b = s['pretrain'], s['finetune'], s['book']
    lines = [
        f"# gluon-bert reproduce ({s['recipe']} recipe, {s['data']})",
        '',
        f"{s['date']}, devices {', '.join(s['devices'])}, {s['machine']}",
        '',
        '| stage | metric | ours | book (MXNet, 2 GPUs) |',
        '|---|---|---|---|',
        f"| pretrain ({p['steps']} steps) | MLM loss (mean of all steps) | {_fmt(p['mlm'])} "
        f"| {b['mlm']} |",
        f"| | NSP loss (mean of all steps) | {_fmt(p['nsp'])} | {b['nsp']} |",
        f"| | MLM / NSP loss, last interval | {_fmt(p['mlm_last'])} / {_fmt(p['nsp_last'])} | - |",
        f"| | pairs/s | {_fmt(p['pairs_per_sec'], 0)} | {b['pairs_per_sec']} |",
        f"| fine-tune | train loss | {_fmt(f['loss'])} | {b['finetune_loss']} |",
        f"| | train acc | {_fmt(f['train_acc'])} | - |",
        f"| | eval acc | {_fmt(f['eval_acc'])} | {b['test_acc']} |",
        f"| | examples/s | {_fmt(f['examples_per_sec'], 0)} | {b['examples_per_sec']} |",
        '',
        'Chance accuracy on 3 balanced classes is 0.333. The book fine-tunes its downloaded '
        'bert.small; this run fine-tunes the BERT it just pretrained, so only the sample '
        'recipe\'s own numbers and the pretraining losses of the book recipe are comparable.',
        '',
        'Plots: pretrain/loss.png, finetune/curves.png',
    ]
    lines += [f'- {n}' for n in s['notes']]
    return '\n'.join(lines) + '\n'
