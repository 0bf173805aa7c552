"""``mav tune`` and ``mav edit``: Tune-A-Video (Wu et al., 2023) on the cascade's D^t.

    mav tune clip.mp4 --caption "a red circle on a white background" --output tuned/   # one video, tuned
    mav edit --tuned tuned/ "a blue square on a white background" --out edit.mp4       # its motion, a new subject
    mav batch --checkpoint tuned/ --prompts edits.txt --output s3://b/edits            # the same, at scale

``mav tune`` samples D^t's keyframes from the clip, fine-tunes D^t on them under the source condition with
sparse-causal attention on Ray Train (the shared loop of ``workflows.train``), DDIM-inverts them with the
tuned network and writes a bundle: ``decoder/`` (the tuned network), a reference to the base bundle for
every other stage, ``inversion.safetensors`` (keyframes, condition, fps, inverted noise) and ``tune.yaml``
(the settings, the parameters trained, the figures). Any command that runs a bundle runs a tuned one as an
edit of its source: D^t starts from the inverted noise (``workflows.runners.DecoderRunner``), conditioned
on each prompt's y_e, then ↑F, SR_l^t and SR_h run as in ``mav generate``.

The package: ``source`` (the clip, read and sampled), ``job`` (the tuning run), ``edit`` (edits through the
cascade), ``command`` (the CLI).
"""

from workflows.tune.command import add_parsers
from workflows.tune.job import TuneJob, TuneSettings, load_settings, run_tune
from workflows.tune.source import TuneError

__all__ = ["TuneError", "TuneJob", "TuneSettings", "add_parsers", "load_settings", "run_tune"]
