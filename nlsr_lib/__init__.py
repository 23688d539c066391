"""nlsr: safety re-alignment of fine-tuned language models (NLSR, EXPO, model fusion), Jupyter-first."""

from .progress import quiet_libraries as _quiet_libraries

__version__ = "0.1.0"

_quiet_libraries()  # before datasets/transformers are imported: their routine bars and notes off (progress.py)
