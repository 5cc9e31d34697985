"""Training: devices and KVStore, one step per task, the runners, the one training loop."""
from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from .common import TrainingInterrupted
from .devices import make_kvstore, parse_contexts, try_all_gpus
from .finetune import evaluate_accuracy, finetune
from .loop import initial_state, train
from .pretrain import pretrain
from .runners import MXNetRunner, make_runner
from .schedule import learning_rate
from .step import FinetuneStep, PretrainStep, make_trainer, mlm_loss, nsp_loss

__all__ = ['CheckpointError', 'latest_checkpoint', 'save_checkpoint', 'TrainingInterrupted',
           'make_kvstore', 'parse_contexts', 'try_all_gpus', 'evaluate_accuracy', 'finetune',
           'initial_state', 'train', 'pretrain', 'MXNetRunner',
           'make_runner', 'learning_rate', 'FinetuneStep', 'PretrainStep', 'make_trainer',
           'mlm_loss', 'nsp_loss']
