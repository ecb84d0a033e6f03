"""`kernels` (which transformers imports from 5.25 on) reads its own python_depends.json at import."""

from PyInstaller.utils.hooks import collect_data_files

datas = collect_data_files("kernels")
