"""PyTorch and JAX versions of the same BERT, weight conversion, and training runners.

    torch_bert.py   the model in PyTorch (same class names and parameter paths as MXNet)
    jax_bert.py     the model in plain JAX (pure init/apply, params as nested dicts)
    convert.py      one mapping table per port, MXNet <-> torch / d2l.torch / JAX

The runners that train them (and our MXNet model) behind one interface live with the
training loop, in gluon_bert/train/runners.py.

Nothing here imports torch or jax until a port is used, so `gluon_bert` works without the
`torch` and `jax` extras.
"""
