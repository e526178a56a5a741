"""Started by every Python process a test launches (this folder is first on PYTHONPATH):
enforce the network rule there too (``guard.py``)."""

import os

if os.environ.get("ACTFLEET_NETGUARD") == "1":
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location(
        "actfleet_netguard", pathlib.Path(__file__).with_name("guard.py")
    )
    if _spec is not None and _spec.loader is not None:
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
        _mod.install()
