"""Classify premise/hypothesis pairs with a fine-tuned BERTClassifier."""
from __future__ import annotations

import sys

import mxnet as mx

__all__ = ['predict_pairs', 'read_pairs', 'LABELS']

LABELS = ('entailment', 'contradiction', 'neutral')  # the book's label ids 0, 1, 2


def read_pairs(path):
    """premise<TAB>hypothesis per line; '-' reads standard input.

    A file that is missing, unreadable, not UTF-8, malformed or without pairs raises
    DataError naming it (and the line).
    """
    import io
    from .data.vocab import decode_utf8, read_bytes
    from .errors import DataError
    if path == '-':
        stream = getattr(sys.stdin, 'buffer', None)  # bytes, to name the line of bad UTF-8
        data = stream.read() if stream is not None else sys.stdin.read().encode('utf-8')
    else:
        data = read_bytes(path)
    name = '<stdin>' if path == '-' else path
    pairs = []
    # newline=None: lines end as text-mode open() ends them ('\n', '\r\n' or '\r')
    for lineno, line in enumerate(io.StringIO(decode_utf8(data, name), newline=None), 1):
        if not line.strip():
            continue
        parts = line.rstrip('\n').split('\t')
        if len(parts) != 2:
            raise DataError(f'{name}:{lineno}: expected premise<TAB>hypothesis, '
                            f'got {len(parts)} field(s)')
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise DataError(f'{name}: no pairs to classify')
    return pairs


def predict_pairs(run, pairs, max_len=None, devices=None, batch_size=256):
    from .data.snli import SNLIBERTDataset, tokenize_like_snli
    from .pretrained import load_classifier
    from .train import parse_contexts
    from .train.step import PackedForward
    contexts = parse_contexts(devices)
    net, vocab, config = load_classifier(run, contexts)
    if max_len:
        config.check_max_len(max_len)
    max_len = max_len or min(128, config.max_len)
    premises = [tokenize_like_snli(p) for p, _ in pairs]
    hypotheses = [tokenize_like_snli(h) for _, h in pairs]
    data = SNLIBERTDataset((premises, hypotheses, [0] * len(pairs)), max_len, vocab,
                           num_workers=1)
    arrays = data.arrays
    # the classifier on each batch's real tokens only (`data.packing`): the padded batch's
    # logits without its arithmetic on padding
    forward = PackedForward(net)
    keys = ('tokens', 'segments', 'valid_lens')
    rows = []
    for lo in range(0, len(pairs), batch_size):
        batch = {k: arrays[k][lo:lo + batch_size] for k in keys}
        probs = mx.nd.softmax(forward(batch, contexts[0]), axis=-1).asnumpy()
        sl = slice(lo, lo + batch_size)
        for (p, h), pr in zip(pairs[sl], probs):
            rows.append(dict(premise=p, hypothesis=h, label=LABELS[int(pr.argmax())],
                             probabilities={name: round(float(x), 4)
                                            for name, x in zip(LABELS, pr)}))
    return rows
