"""Folder of the ``png_recall`` evaluate module (a package only so that it ships with flmm_hf)."""
