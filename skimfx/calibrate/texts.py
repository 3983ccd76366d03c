"""Calibration text that needs no download: ``reference_texts``."""
from __future__ import annotations

from pathlib import Path


def reference_texts() -> list[str]:
    """Real English text that ships with the system: the license texts under /usr/share/common-licenses
    and Python's own LICENSE, then docstrings of standard-library modules (Python's documentation)."""
    import importlib
    import inspect
    import sysconfig

    texts = []
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        for p in sorted(lic.iterdir()):
            if p.is_file() and p.stat().st_size > 2000:
                texts.append(p.read_text(errors="ignore"))
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.exists():
        texts.append(py_license.read_text(errors="ignore"))
    for name in ("argparse", "collections", "json", "logging", "pathlib", "re", "subprocess", "typing", "unittest",
                 "dataclasses", "asyncio", "functools", "itertools", "csv", "sqlite3"):
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(getattr(mod, a)) or "" for a in sorted(dir(mod))
                                              if not a.startswith("_") and callable(getattr(mod, a, None))]
        text = "\n\n".join(d for d in docs if len(d) > 80)
        if text:
            texts.append(text)
    return texts


__all__ = ["reference_texts"]
