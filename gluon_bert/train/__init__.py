"""Training: devices and KVStore, one step per task, the pretraining and fine-tuning loops."""
from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from .common import TrainingInterrupted
from .devices import make_kvstore, parse_contexts, try_all_gpus
from .finetune import evaluate_accuracy, finetune, load_bert, load_classifier
from .pretrain import pretrain
from .schedule import learning_rate
from .step import FinetuneStep, PretrainStep, make_trainer, mlm_loss, nsp_loss

__all__ = ['CheckpointError', 'latest_checkpoint', 'save_checkpoint', 'TrainingInterrupted',
           'make_kvstore', 'parse_contexts', 'try_all_gpus', 'evaluate_accuracy', 'finetune',
           'load_bert', 'load_classifier', 'pretrain', 'learning_rate', 'FinetuneStep',
           'PretrainStep', 'make_trainer', 'mlm_loss', 'nsp_loss']
