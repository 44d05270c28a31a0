"""The lmms-eval plugin tests run in their own environment (.ci/run builds it): without lmms-eval
installed they are not collected, so the core suite stays light. Run them with
``python -m pytest tests/lmms_eval``: a run that collects nothing fails (pytest exit 5)."""

from importlib.util import find_spec

collect_ignore_glob = [] if find_spec("lmms_eval") is not None else ["test_*.py"]
