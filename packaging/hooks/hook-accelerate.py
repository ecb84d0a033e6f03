"""transformers imports accelerate only when an FP8 checkpoint loads, after asking for its metadata."""

from PyInstaller.utils.hooks import copy_metadata

datas = copy_metadata("accelerate")
