"""gluon-bert: the BERT chapters of Dive into Deep Learning in MXNet Gluon."""
__version__ = '0.1.0'

from .cpu import enable_amx as _enable_amx, tune_openblas as _tune_openblas

_tune_openblas()  # before MXNet loads its OpenBLAS (a no-op once it has)
_enable_amx()     # before oneDNN picks its instruction set (a no-op on CPUs without AMX)


def load_pretrained(*args, **kwargs):
    """(BERTModel, Vocab) from bert.small, bert.base, a zip or a folder: see gluon_bert.pretrained."""
    from .pretrained import load_pretrained as _load
    return _load(*args, **kwargs)
