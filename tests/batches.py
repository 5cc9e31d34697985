"""Small random pretraining batches for the step tests (the data pipeline's dict layout)."""
import numpy as onp


def pretrain_batch(rs, B=8, L=12, P=3, vocab=60, drop=0.2):
    """B sequences of random lengths (padding id 0 past them), P predictions inside each,
    and mlm_weights 0 for about a share `drop` of the predictions (padding predictions)."""
    valid = rs.randint(P + 2, L + 1, B)
    tokens = rs.randint(5, vocab, (B, L)).astype('int32')
    for b, n in enumerate(valid):
        tokens[b, n:] = 0
    positions = onp.stack([rs.choice(n, P, replace=False) for n in valid]).astype('int32')
    return dict(tokens=tokens, segments=(rs.rand(B, L) > .5).astype('int32'),
                valid_lens=valid.astype('float32'), pred_positions=positions,
                mlm_weights=(rs.rand(B, P) > drop).astype('float32'),
                mlm_labels=rs.randint(0, vocab, (B, P)).astype('int32'),
                nsp_labels=rs.randint(0, 2, B).astype('int32'))
