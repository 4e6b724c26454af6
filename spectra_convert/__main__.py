"""``python -m spectra_convert`` (used by ``accelerate launch -m spectra_convert``)."""

from .cli import main

main()
