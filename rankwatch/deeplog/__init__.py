"""DeepLog for rankwatch: the model and checkpoints (model.py), the `rankwatch deeplog train|evaluate` CLIs
(train.py, evaluate.py) with their config (config.py) and streaming data sources (data.py)."""

from rankwatch.deeplog.model import PAD, UNK, DeepLog, ModelArgs, Vocabulary, load_checkpoint, save_checkpoint

__all__ = ["DeepLog", "ModelArgs", "Vocabulary", "load_checkpoint", "save_checkpoint", "PAD", "UNK"]
