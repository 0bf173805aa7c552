"""``mav train``: distributed training of every stage on Ray Train, one shared loop.

    mav train clip          --data s3://b/shapes --output s3://b/model --workers 2
    mav train prior         --data s3://b/shapes --output s3://b/model --workers 2
    mav train decoder       --data s3://b/shapes --output s3://b/model
    mav train sr-low        --data s3://b/shapes --output s3://b/model
    mav train sr-high       --data s3://b/shapes --output s3://b/model
    mav train decoder-video --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav train sr-low-video  --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav train interpolation --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav generate "a red circle" --checkpoint s3://b/model --out circle.mp4

``--output`` is a checkpoint bundle: each stage writes its directory there (``clip/``, ``prior/``,
``decoder/`` ...), in the format every command loads; stages that need CLIP (prior, decoder and the
video stages) read it from ``--clip`` or else from the bundle itself. Ray Train's own run state
(checkpoints with the optimizer and EMA, for ``--resume`` and worker failures) lives under
``--output/_train/STAGE``, with the metrics: ``metrics.csv`` and TensorBoard events in ``tensorboard/``.

The package: ``job`` (what to train, checked, on a ``TorchTrainer``), ``loop`` (what each worker runs),
``data`` (Ray Data readers), ``metrics`` (CSV and TensorBoard), ``command`` (the CLI). Per-stage facts
(what a stage produces, starts from, reads and optimises) are ``stages.training.TRAINING_STAGES``.
"""

from workflows.train.command import add_parsers
from workflows.train.data import DataError
from workflows.train.job import TrainJob, cpus_needed, has_run, read_metrics, run_training

__all__ = ["DataError", "TrainJob", "add_parsers", "cpus_needed", "has_run", "read_metrics", "run_training"]
