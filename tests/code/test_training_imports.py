"""training/ imports with only torch, transformers, numpy, pandas, pyarrow and ray; recflow.modeling
with only torch, transformers, numpy and safetensors (and never imports training/)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import importlib.machinery
    import sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"blocked in this test: {{spec.name}}")

        def exec_module(self, module):  # pragma: no cover - create_module raises first
            raise ModuleNotFoundError(module.__name__)

    class Block(importlib.abc.MetaPathFinder):
        # A spec is returned (so availability probes such as find_spec() still work) but any real
        # import of a blocked module fails, as if the package were not installed.
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _run(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)


def test_training_imports_without_feast_prefect_bentoml() -> None:
    r = _run(
        {"feast", "prefect", "bentoml", "pydantic_settings", "duckdb", "recflow.settings"},
        """
        import training, training.examples, training.train_data, training.evaluate, training.baselines
        import training.trainer, training.tune, training.pipeline, training.text_cache, training.synthetic
        from training.tune import default_search_space
        default_search_space(gpu=False)
        bad = [m for m in sys.modules if (m.split(".")[0] in BLOCKED or m in BLOCKED) and sys.modules[m] is not None]
        assert not bad, bad
        print("ok")
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_modeling_imports_without_training_pandas_ray() -> None:
    r = _run(
        {"feast", "prefect", "bentoml", "pydantic_settings", "duckdb", "pandas", "pyarrow", "ray", "training"},
        """
        import recflow.modeling as m
        model = m.build_tiny_model(n_items=8)
        index = m.build_index(model)
        q = m.user_query(model, {"history_item_ids": ["i1"], "history_ts": [100]})
        assert index.scores(q).shape == (8,)
        assert "training" not in sys.modules
        print("ok")
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
