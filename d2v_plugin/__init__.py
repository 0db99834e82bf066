"""d2v_plugin: data2vec 1.0 and 2.0 as a fairseq plugin.

Importing the package allow-lists the few classes fairseq checkpoints pickle so
``torch.load``'s safe loader (default since torch 2.6) accepts them without turning it
off and, where fairseq is installed, registers the ``d2v_*`` tasks, models and criteria
(fairseq auto-imports only ``models/`` and ``tasks/`` of a user dir, so the criteria are
imported here). Without fairseq, ``d2v_plugin.load`` and extraction still work (on
checkpoints and on ``python -m d2v_plugin.export`` folders); training needs fairseq.
"""
import logging

from . import checkpoints  # noqa: F401  (allow-lists checkpoint globals)

try:
    import fairseq as _fairseq  # noqa: F401
    HAS_FAIRSEQ = True
except ImportError:  # loading and extracting only
    HAS_FAIRSEQ = False
if HAS_FAIRSEQ:
    from .criterions import classification, ctc, d2v  # noqa: F401
    from .models import d2v_audio_classifier, d2v_ctc, d2v_image_classifier, d2v_multi, d2v_text_classifier  # noqa: F401
    from .tasks import asr_finetuning, audio_classification, audio_pretraining, image, multimodal, text  # noqa: F401

# fairseq's wav2vec2_classification module sets the root logger to DEBUG when imported,
# which makes Pillow log every PNG chunk in our own command-line tools
logging.getLogger("PIL").setLevel(logging.INFO)

__version__ = "0.1.0"


def load(path: str, modality=None, weights=None):
    """``d2v_plugin.load(path).extract(inputs)``: see :func:`d2v_plugin.extract.load` (imported
    on first use, so ``python -m d2v_plugin.extract`` does not run a module already imported)."""
    from .extract import load as _load

    return _load(path, modality, weights)
