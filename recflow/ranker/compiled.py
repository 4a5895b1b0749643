"""The ranker's boosters compiled to machine code (lleaves, LLVM), for serving.

LightGBM walks its trees node by node in a generic loop: about 7 microseconds per candidate row for
the default ranker's 158 trees, a third of what one ``/recommend`` ranking costs. lleaves compiles
each tree into branches of native code for this CPU; the scores are LightGBM's to the last bits of a
float64 (its comparisons are the same), about five times faster on a request's few hundred rows,
and its call releases the GIL.

:func:`compile_ranker` returns a copy of a :class:`~recflow.ranker.model.Ranker` whose boosters
(bag members included) predict through compiled code. Compiled objects are cached under a folder
(the service uses ``<home>/cache/lleaves``), named by a hash of the model text, the CPU and the
compiler versions, so the second worker and every restart load in milliseconds; a cache file is
written under a temporary name and renamed, so workers compiling at once never read half of one.
Anything else a booster is asked (trees, importances) goes to the LightGBM booster it came from.

Training and the offline evaluation keep LightGBM; ``tests/model`` asserts the compiled scores
equal LightGBM's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from recflow.durable import replace_durably, write_text_durably
from recflow.ranker.model import BoosterBag, Ranker, members

CACHE_DIR = "lleaves"


class CompiledBooster:
    """A LightGBM booster's ``predict`` through its lleaves-compiled trees; every other attribute
    is the original booster's."""

    def __init__(self, compiled: Any, booster: Any) -> None:
        self._compiled = compiled
        self._booster = booster

    def predict(self, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Scores of the rows of ``x``, as ``lightgbm.Booster.predict`` (``num_threads`` 0: every core)."""
        data = np.ascontiguousarray(x, dtype=np.float64)
        if len(data) == 0:
            return np.zeros(0, np.float64)
        return np.asarray(self._compiled.predict(data, n_jobs=num_threads or os.cpu_count() or 1), dtype=np.float64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._booster, name)


def _host_key() -> str:
    """What a compiled object depends on besides the model: the compiler versions and this CPU."""
    from importlib.metadata import version

    import llvmlite
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return "|".join([version("lleaves"), llvmlite.__version__, llvm.get_host_cpu_name(),
                     llvm.get_host_cpu_features().flatten()])


def compile_booster(booster: Any, cache: Path) -> CompiledBooster:
    """``booster`` (a ``lightgbm.Booster``) compiled with lleaves, through the object cache under ``cache``."""
    import lleaves

    text = booster.model_to_string()
    key = hashlib.sha256((_host_key() + "\n" + text).encode()).hexdigest()[:32]
    cache.mkdir(parents=True, exist_ok=True)
    model_file, obj = cache / f"{key}.txt", cache / f"{key}.o"
    if not model_file.exists():
        write_text_durably(model_file, text)
    model = lleaves.Model(model_file=str(model_file))
    if obj.exists():
        model.compile(cache=str(obj))
    else:  # lleaves writes its cache where no file is: a name of this process's, then renamed
        tmp = cache / f".{key}.{os.getpid()}.o"
        tmp.unlink(missing_ok=True)
        try:
            model.compile(cache=str(tmp))
            replace_durably(tmp, obj)
        finally:
            tmp.unlink(missing_ok=True)
    return CompiledBooster(model, booster)


def _compiled(booster: Any, cache: Path) -> Any:
    if booster is None:
        return None
    parts = [compile_booster(m, cache) for m in members(booster)]
    return parts[0] if len(parts) == 1 else BoosterBag(parts)


def compile_ranker(ranker: Ranker, cache: Path) -> tuple[Ranker, float]:
    """A copy of ``ranker`` whose boosters predict through compiled code, and the seconds it took
    (compiling ~4 s per 150 trees on one core; a cached object loads in milliseconds). Raises
    ImportError without lleaves, and whatever lleaves raises on a model it cannot compile."""
    started = time.perf_counter()
    out = dataclasses.replace(ranker, booster=_compiled(ranker.booster, cache),
                              unseen=_compiled(ranker.unseen, cache), seen=_compiled(ranker.seen, cache))
    return out, time.perf_counter() - started


def _original(booster: Any) -> Any:
    if booster is None:
        return None
    parts = [m._booster if isinstance(m, CompiledBooster) else m for m in members(booster)]
    return parts[0] if len(parts) == 1 else BoosterBag(parts)


def lightgbm_ranker(ranker: Ranker) -> Ranker:
    """``ranker`` with LightGBM predicting again (the inverse of :func:`compile_ranker`; benchmarks
    compare the two on the same requests)."""
    return dataclasses.replace(ranker, booster=_original(ranker.booster), unseen=_original(ranker.unseen),
                               seen=_original(ranker.seen))


def is_compiled(ranker: Ranker) -> bool:
    """Whether ``ranker``'s main booster predicts through compiled trees."""
    return any(isinstance(m, CompiledBooster) for m in members(ranker.booster))

