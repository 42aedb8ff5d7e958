"""Folder of the ``refer_seg`` evaluate module (a package only so that it ships with flmm_hf)."""
