"""spcxr: self-supervised chest X-ray foundation models (GMML pretraining of ViTs).

Implements the SPCXR / SS-CXR method (Anwar et al., arXiv 2211.12944) with the defaults of
the authors' GMML reference code (Atito, Awais, Kittler, "GMML is all you need", ICIP 2023).
"""

__version__ = "0.1.0"
