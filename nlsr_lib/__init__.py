"""nlsr: safety re-alignment of fine-tuned language models (NLSR, EXPO, model fusion), Jupyter-first."""

__version__ = "0.1.0"
