"""gluon-bert: the BERT chapters of Dive into Deep Learning in MXNet Gluon."""
__version__ = '0.1.0'
